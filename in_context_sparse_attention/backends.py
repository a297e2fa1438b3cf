"""Registry of ISA backends: their names (`BACKEND_NAMES`, written nowhere else) and `get_backend`.

Every backend is an `ISABackend` (backend_base.py, where the interface is documented).
Backends are imported lazily, so a missing optional package only matters when it is used.
"""
from __future__ import annotations

import importlib

from .backend_base import ISABackend

_BACKENDS = {
    "torch": ("in_context_sparse_attention.reference", "TorchBackend"),
    "triton": ("in_context_sparse_attention.triton_backend", "TritonBackend"),
    "tilelang": ("in_context_sparse_attention.tilelang_backend", "TileLangBackend"),
}
_INSTANCES: dict[str, ISABackend] = {}

BACKEND_NAMES = tuple(_BACKENDS)


def get_backend(name: str) -> ISABackend:
    """The backend object for `name` (one of BACKEND_NAMES), created once per process."""
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
