"""Shared pytest set-up.

- The `gpu` marker skips cleanly on machines without CUDA.
- Without CUDA, Triton kernels run on triton's CPU interpreter. Triton fixes a kernel's
  mode when the kernel is defined (at import), so TRITON_INTERPRET must be set before any
  test module imports a module that defines kernels: here, before collection starts.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marker `gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
