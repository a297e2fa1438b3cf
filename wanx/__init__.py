"""Wan 2.2 components that LIVEditor uses besides the DiT, on well-kept libraries.

- `wanx.video`: read / write mp4 (imageio + imageio-ffmpeg), 540p aspect buckets,
  resize and crop to [-1, 1] tensors, the VAE's 4k+1 frame rule.
- `wanx.vae`: `WanVAE`, diffusers' `AutoencoderKLWan` with Wan's latent normalisation.
- `wanx.t5`: `WanTextEncoder`, transformers' `UMT5EncoderModel` loaded from Wan's
  checkpoint naming; `wanx.tokenizer`: Wan's text cleaning and 512-token padding.

Submodules are imported on demand so that `import wanx` stays cheap.
"""
