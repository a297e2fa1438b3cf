"""An ISA call never makes the host wait for the GPU.

A hidden synchronisation (a Python scalar copied into a CUDA tensor, `.item()`, a blocking
host-to-device copy) stalls the launch queue in every call of every layer: the GPU idles
while the host launches what follows (what it cost: docs/benchmarks.md).
"""
import pytest
import torch

from in_context_sparse_attention import editing_sparse_attention
from in_context_sparse_attention.residual import per_token_gate


def test_per_token_gate_of_a_float_and_of_a_tensor():
    seq = 7
    from_float = per_token_gate(0.25, 2, seq, torch.device("cpu"))
    from_tensor = per_token_gate(torch.full((1, seq, 1, 1), 0.25, dtype=torch.float64), 2, seq, torch.device("cpu"))
    per_token = torch.arange(seq, dtype=torch.float32).view(1, seq, 1, 1)
    assert from_float.shape == from_tensor.shape == (2, seq) and from_float.dtype == torch.float32
    assert torch.equal(from_float, from_tensor) and (from_float == 0.25).all()
    assert torch.equal(per_token_gate(per_token, 2, seq, torch.device("cpu")), per_token.view(1, seq).expand(2, seq))


def backend_available(name: str) -> bool:
    if name != "tilelang":
        return True
    try:
        import tilelang  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "tilelang"])
@pytest.mark.parametrize("alpha_kind", ["none", "float", "tensor"])
def test_isa_call_does_not_synchronise(backend, alpha_kind):
    if not backend_available(backend):
        pytest.skip("tilelang is not installed")
    t_len, c_len = 1000, 1030  # a partial last block, so every path that handles it runs
    q, k, v = (torch.randn(1, t_len + c_len, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    alpha = {"none": None, "float": 0.3, "tensor": torch.rand(1, t_len + c_len, 1, 1, device="cuda")}[alpha_kind]
    editing_sparse_attention(q, k, v, t_len, c_len, alpha=alpha, backend=backend)  # compiles, autotunes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = editing_sparse_attention(q, k, v, t_len, c_len, alpha=alpha, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.isfinite().all()
