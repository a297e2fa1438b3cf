"""Inputs for the tiny DiT, shared by the model and memory tests."""
import torch


def inputs(batch=2, frames=2, size=16, seed=0, text_dim=32):
    """(latent [batch, 16, frames, size, size], source [1, ...], timesteps [batch], `batch` prompts of
    5, 11 and 7 rows): one source shared by the batch, prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 16, frames, size, size, generator=g)
    source = torch.randn(1, 16, frames, size, size, generator=g)
    timestep = torch.tensor([999.0, 623.0, 17.0][:batch])
    context = [torch.randn(n, text_dim, generator=g) for n in (5, 11, 7)[:batch]]
    return latent, source, timestep, context
