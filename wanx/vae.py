"""The Wan 2.1 video VAE (used by Wan 2.2 A14B) on diffusers' `AutoencoderKLWan`.

Strides: time 4 (causal: frame 0 alone, then groups of 4), space 8; z_dim 16. A video of
F = 4k+1 frames and H x W pixels becomes (F-1)//4+1 latent frames of H/8 x W/8.

Latents are normalised per channel the way Wan does it: z = (mu - mean) * (1 / std),
with mu the mode (mean) of the encoder's Gaussian, no sampling. The 16 means and stds
below are the constants of Wan 2.1's `WanVAE` (`wan/modules/vae.py`); diffusers ships
the same numbers as `AutoencoderKLWan`'s default `latents_mean` / `latents_std`, and
`configs/wan_vae/config.json` carries them, which is where `WanVAE` reads them from.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import torch

from .dit_loader import CheckpointError, error_line, load_tensor, match_keys, read_entries, require_floating

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "wan_vae"

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

# A random VAE with the full model's layout (so Wan's key naming and diffusers' converter
# apply unchanged) but 8 base channels instead of 96: for tests and the CPU demo.
TINY_CONFIG = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    latents_mean=list(WAN21_LATENTS_MEAN),
    latents_std=list(WAN21_LATENTS_STD),
)

# A key every original Wan VAE checkpoint has (diffusers detects the format the same way).
_WAN_MARKER_KEY = "decoder.middle.0.residual.0.gamma"


def convert_wan_vae_state_dict(state_dict: dict) -> dict:
    """Rename an original Wan VAE state dict to diffusers' `AutoencoderKLWan` names.

    This is the very function `AutoencoderKLWan.from_single_file` applies (looked up in
    diffusers' single-file registry), exposed so the key coverage can be checked first.
    Tensors are not copied.
    """
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    convert = SINGLE_FILE_LOADABLE_CLASSES["AutoencoderKLWan"]["checkpoint_mapping_fn"]
    return convert(checkpoint=state_dict)


def build_meta_vae(config_dir: str | os.PathLike = CONFIG_DIR):
    """`AutoencoderKLWan` from a config folder on the meta device (shapes only, no memory).

    Raises:
        CheckpointError: the folder has no readable config for `AutoencoderKLWan`.
    """
    from diffusers import AutoencoderKLWan

    try:
        config = AutoencoderKLWan.load_config(os.fspath(config_dir), local_files_only=True)
        with torch.device("meta"):
            return AutoencoderKLWan.from_config(config)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"VAE config {config_dir} is not a readable AutoencoderKLWan config: "
                              f"{error_line(error)}") from error


def check_vae_keys(diffusers_state_dict: Mapping, model: torch.nn.Module, source: str | os.PathLike = "") -> None:
    """Raise CheckpointError unless the (converted) state dict has exactly the model's keys and shapes.

    A VAE with a random layer still decodes, to garbage, so coverage is checked strictly
    (diffusers' `from_single_file` would keep the random init of a missing key and only log
    an unexpected one). The values may be tensors or `wanx.dit_loader` entries (anything
    with a `.shape`); `source` names the file in the message.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    match_keys(expected, diffusers_state_dict, f"VAE checkpoint {source}".rstrip())


def _weights_location(path: Path) -> tuple[Path, Path | None]:
    """(weights, config folder or None for the given config) of a single file or a diffusers folder."""
    if not path.is_dir():
        return path, None
    folder = path if (path / "config.json").is_file() else path / "vae"
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"VAE folder {path} has no config.json (nor vae/config.json)")
    legacy = folder / "diffusion_pytorch_model.bin"
    if not any(folder.glob("*.safetensors")) and legacy.is_file():
        return legacy, folder
    return folder, folder


def _prepare(path: str | os.PathLike, config: str | os.PathLike):
    """The meta model and its checked entries (diffusers names): every check that needs no tensor data.

    `check_vae_checkpoint` runs this alone and `WanVAE.from_checkpoint` runs it first.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VAE checkpoint {path} does not exist (expected Wan2.1_VAE.pth or a diffusers folder)")
    weights, folder_config = _weights_location(path)
    entries = read_entries(weights)
    if _WAN_MARKER_KEY in entries:
        entries = convert_wan_vae_state_dict(entries)
    model = build_meta_vae(folder_config or config)
    check_vae_keys(entries, model, weights)
    require_floating(entries)
    return model, entries


def check_vae_checkpoint(path: str | os.PathLike, config: str | os.PathLike = CONFIG_DIR) -> None:
    """Check a VAE checkpoint as `WanVAE.from_checkpoint` would load it, without reading tensor data.

    Same `path` and `config` as `from_checkpoint`. The file (or the diffusers folder's
    weights) must open as safetensors or as a torch pickle read with weights_only=True,
    hold a state dict, and have exactly the keys and shapes of the configured
    `AutoencoderKLWan` (original Wan naming is converted first), all floating point. Only
    headers are read: a safetensors header, or a zip-format pickle's structure (memory-
    mapped); a legacy non-zip pickle is read whole. NaN and Inf need the data:
    `from_checkpoint` refuses them as it loads each tensor.

    Raises:
        CheckpointError: the problem in one line, naming the file.
    """
    _prepare(path, config)


class WanVAE:
    """Encode [-1, 1] videos to Wan-normalised latents and back.

    Wraps a diffusers `AutoencoderKLWan` (`.model`), kept in eval mode without gradients.
    Build it with `from_checkpoint` (original `Wan2.1_VAE.pth` or a diffusers folder) or
    `tiny` (random, small, for tests and the CPU demo).
    """

    temporal_stride = 4
    spatial_stride = 8

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)
        config = model.config
        self.z_dim = int(config.z_dim)
        if len(config.latents_mean) != self.z_dim or len(config.latents_std) != self.z_dim:
            raise ValueError(f"VAE config needs {self.z_dim} latents_mean and latents_std values, got "
                             f"{len(config.latents_mean)} and {len(config.latents_std)}")
        # [1, z, 1, 1, 1], float32; Wan multiplies by 1/std rather than dividing by std.
        self.latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.latents_inv_std = 1.0 / torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        config: str | os.PathLike = CONFIG_DIR,
        tiling: bool = False,
    ) -> "WanVAE":
        """Load the VAE from the original Wan checkpoint or a diffusers folder, offline.

        Everything `check_vae_checkpoint` checks is checked first, then each tensor is read,
        converted to `dtype` on `device` and refused if it holds NaN or Inf
        (`wanx.dit_loader.load_tensor`), and the tensors become the parameters of the
        model built on the meta device, with no second copy.

        Args:
            path: `Wan2.1_VAE.pth` (or .safetensors; original Wan naming or already
                diffusers naming), or a diffusers folder with `config.json` (directly or
                in a `vae/` subfolder).
            dtype: parameter dtype; Wan runs its VAE in float32.
            device: where the model goes.
            config: diffusers config folder used for single-file checkpoints; defaults to
                the shipped `configs/wan_vae`.
            tiling: decode/encode in spatial tiles to save memory (see `enable_tiling`).
        Raises:
            CheckpointError: any problem with the files, in one line naming the file.
        """
        model, entries = _prepare(path, config)
        logger.info("loading VAE checkpoint %s", path)
        state_dict = {name: load_tensor(entry, dtype, device) for name, entry in entries.items()}
        try:
            model.load_state_dict(state_dict, strict=True, assign=True)
        except RuntimeError as error:
            raise CheckpointError(f"VAE checkpoint {path} does not load: {error_line(error)}") from error
        vae = cls(model)
        if tiling:
            vae.enable_tiling()
        return vae

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> "WanVAE":
        """A random VAE of `TINY_CONFIG` (z_dim 16, strides 4/8/8, Wan's constants), seeded."""
        from diffusers import AutoencoderKLWan

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoencoderKLWan(**TINY_CONFIG)
        if dtype != torch.float32:
            model.to(dtype=dtype)
        return cls(model.to(device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device) -> "WanVAE":
        self.model.to(device)
        return self

    def offload(self) -> "WanVAE":
        """Move the weights to the CPU and release cached GPU memory."""
        self.model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self

    def enable_tiling(self, **kwargs) -> None:
        """Process frames in overlapping spatial tiles (diffusers' `enable_tiling` options)."""
        self.model.enable_tiling(**kwargs)

    def disable_tiling(self) -> None:
        self.model.disable_tiling()

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[z_dim, F', H', W'] of the latents of a video of `frames` x `height` x `width`."""
        return (self.z_dim, (frames - 1) // self.temporal_stride + 1,
                height // self.spatial_stride, width // self.spatial_stride)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Encode videos to normalised latents.

        Args:
            video: [B, 3, F, H, W] in [-1, 1], F = 4k+1 (see `wanx.video.fit_frame_count`),
                H and W multiples of 8.

        Returns:
            float32 [B, 16, (F-1)//4+1, H//8, W//8], (mode - mean) * (1 / std) per channel.
        """
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if hasattr(video, "shape") else type(video).__name__
            raise ValueError(f"video must be a tensor [B, 3, F, H, W], got {shape}")
        frames, height, width = video.shape[2:]
        if frames % self.temporal_stride != 1:
            raise ValueError(f"video must have 4k+1 frames (1, 5, 9, ...) for the Wan VAE, got {frames}; "
                             "trim it with wanx.video.fit_frame_count")
        if height % self.spatial_stride or width % self.spatial_stride:
            raise ValueError(f"video height and width must be multiples of 8, got {height}x{width}")
        x = video.to(device=self.device, dtype=self.dtype)
        mode = self.model.encode(x).latent_dist.mode().float()
        mean, inv_std = self.latents_mean.to(mode.device), self.latents_inv_std.to(mode.device)
        return (mode - mean) * inv_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode normalised latents.

        Args:
            latents: [B, 16, F', H', W'] as returned by `encode`.

        Returns:
            float32 [B, 3, 4(F'-1)+1, 8H', 8W'], clamped to [-1, 1].
        """
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[1] != self.z_dim:
            shape = tuple(latents.shape) if hasattr(latents, "shape") else type(latents).__name__
            raise ValueError(f"latents must be a tensor [B, {self.z_dim}, F, H, W], got {shape}")
        z = latents.float().to(self.device)
        z = z / self.latents_inv_std.to(z.device) + self.latents_mean.to(z.device)
        video = self.model.decode(z.to(self.dtype)).sample
        return video.float().clamp_(-1.0, 1.0)
