"""ISA's two halves of step 4 at once: the sparse half on a second CUDA stream.

The full half (block gathers, the dense kernel, the scatter) and the sparse half (exact
top-E + Taylor) read the same plan and write disjoint rows of one output, so they may run
in either order or together. On CUDA the sparse kernel goes to a second stream, where its
programs fill the SMs that the gathers, the scatter and the dense kernel's last wave leave
idle. Under the H200's power limit that saves about 1% of a call (0.4-0.5 ms at 65,536
tokens, both backends; docs/benchmarks.md); the output is the same bits either way.

The environment variable ISA_CONCURRENT_HALVES turns it off ("0") for profiling one
kernel at a time or for timing both orders (benchmarks/bench_overlap.py); "1", the
default, turns it on. CPU tensors always run the halves one after the other.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

_SWITCH = "ISA_CONCURRENT_HALVES"


def concurrent_halves() -> bool:
    """Whether ISA_CONCURRENT_HALVES lets CUDA calls run the halves together (the default)."""
    value = os.environ.get(_SWITCH, "1").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"{_SWITCH} must be 0 or 1, got {value!r}")
    return value != "0"


@functools.lru_cache(maxsize=None)
def _side_stream(device_index: int) -> torch.cuda.Stream:
    """The second stream of one device, made once per process."""
    return torch.cuda.Stream(device=device_index)


def run_halves(full_half: Callable[[], None], sparse_half: Callable[[], None], device: torch.device) -> None:
    """Run both halves on `device`; on CUDA, the sparse half on a second stream.

    The second stream starts once the caller's current stream has reached this call
    (the pooled means and the plan are ready), and the caller's stream waits for it
    before it goes on, so whatever follows sees both halves written. Tensors allocated
    by the sparse half belong to the second stream's pool and are only reused there, in
    order. Neither the host nor the caller's stream is held back in between.
    """
    if not concurrent_halves() or device.type != "cuda":
        full_half()
        sparse_half()
        return
    caller = torch.cuda.current_stream(device)
    side = _side_stream(device.index if device.index is not None else torch.cuda.current_device())
    side.wait_stream(caller)
    full_half()
    with torch.cuda.stream(side):
        sparse_half()
    caller.wait_stream(side)
