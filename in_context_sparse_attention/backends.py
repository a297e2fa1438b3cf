"""Registry of ISA backends. A backend supplies the two kernel-worthy steps of ISA:

- `pool_blocks(x [B, S, H, D], layout) -> [B, H, NB, D] fp32` block means;
- `sparse_block_attention(q, k, v, plan, out_padded)`: exact top-E + Taylor for the
  diffuse query blocks, written into out_padded [B, NB * b, H, D];
and `check_inputs(q, config)`, which raises a clear ValueError for what it cannot run.
Optionally:
- `make_plan(qc, kc, vc, layout, config) -> ISAPlan`: the block decisions with kernels,
  the same plan as `selection.make_plan` (used without it); the Triton and TileLang
  backends share the Triton one (`triton_selection.py`);
- `gather_blocks` and `scatter_blocks`: the block copies around the dense kernel, with
  the contracts of `full_attention.gather_blocks` / `scatter_blocks` (PyTorch defaults);
- `fuses_residual = True`: its `scatter_blocks` and `sparse_block_attention` take
  `residual=` a `residual.GatedShortcut` and add alpha * Oc[block(t)] to every row they
  write (Triton and TileLang); without it `residual.add_residual` (PyTorch) makes a pass
  over the finished output.
Everything else (the dense half, and the defaults above) is shared.
Backends are imported lazily, so a missing optional package only matters when it is used.
"""
from __future__ import annotations

import importlib

_BACKENDS = {
    "torch": ("in_context_sparse_attention.reference", "TorchBackend"),
    "triton": ("in_context_sparse_attention.triton_backend", "TritonBackend"),
    "tilelang": ("in_context_sparse_attention.tilelang_backend", "TileLangBackend"),
}
_INSTANCES: dict = {}

BACKEND_NAMES = tuple(_BACKENDS)


def get_backend(name: str):
    """The backend object for `name` (one of BACKEND_NAMES)."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {name!r}")
    if name not in _INSTANCES:
        module_name, class_name = _BACKENDS[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"backend {name!r} is not available here: {error}") from error
        _INSTANCES[name] = getattr(module, class_name)()
    return _INSTANCES[name]
