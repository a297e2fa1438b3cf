"""The sparse half on a second CUDA stream: the same bits as one stream, ordered after
the caller's work and before whatever the caller does next."""
import pytest
import torch

from in_context_sparse_attention import concurrency, editing_sparse_attention


def test_switch_accepts_0_and_1_and_refuses_anything_else(monkeypatch):
    monkeypatch.delenv("ISA_CONCURRENT_HALVES", raising=False)
    assert concurrency.concurrent_halves()
    monkeypatch.setenv("ISA_CONCURRENT_HALVES", "0")
    assert not concurrency.concurrent_halves()
    monkeypatch.setenv("ISA_CONCURRENT_HALVES", "1")
    assert concurrency.concurrent_halves()
    monkeypatch.setenv("ISA_CONCURRENT_HALVES", "yes")
    with pytest.raises(ValueError, match="ISA_CONCURRENT_HALVES must be 0 or 1, got 'yes'"):
        concurrency.concurrent_halves()


def test_cpu_runs_the_full_half_then_the_sparse_half(monkeypatch):
    monkeypatch.setenv("ISA_CONCURRENT_HALVES", "1")
    order = []
    concurrency.run_halves(lambda: order.append("full"), lambda: order.append("sparse"), torch.device("cpu"))
    assert order == ["full", "sparse"]


def test_a_bad_switch_is_refused_by_the_call(monkeypatch):
    monkeypatch.setenv("ISA_CONCURRENT_HALVES", "on")
    q, k, v = (torch.randn(1, 96, 2, 16) for _ in range(3))
    with pytest.raises(ValueError, match="ISA_CONCURRENT_HALVES"):
        editing_sparse_attention(q, k, v, 48, 48, backend="torch")


def _backends():
    names = ["torch", "triton"]
    try:
        import tilelang  # noqa: F401

        names.append("tilelang")
    except ImportError:
        pass
    return names


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "tilelang"])
@pytest.mark.parametrize("alpha_kind", ["none", "tensor"])
def test_gpu_concurrent_halves_give_the_bits_of_one_stream(monkeypatch, backend, alpha_kind):
    if backend not in _backends():
        pytest.skip("tilelang is not installed")
    t_len, c_len = 3000, 3100  # a partial last block
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, t_len + c_len, 8, 128)
    q, k, v = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    alpha = None if alpha_kind == "none" else torch.rand(1, t_len + c_len, 1, 1, generator=gen, device="cuda")
    monkeypatch.setenv("ISA_CONCURRENT_HALVES", "0")
    one_stream = editing_sparse_attention(q, k, v, t_len, c_len, alpha=alpha, backend=backend)
    monkeypatch.setenv("ISA_CONCURRENT_HALVES", "1")
    two_streams = editing_sparse_attention(q, k, v, t_len, c_len, alpha=alpha, backend=backend)
    torch.cuda.synchronize()
    assert one_stream.isfinite().all()
    assert torch.equal(two_streams, one_stream)


@pytest.mark.gpu
def test_gpu_second_stream_waits_for_the_callers_stream_and_the_caller_for_it(monkeypatch):
    """q, k, v are made by slow work on a non-default stream just before the call, and the
    output is overwritten on that stream right after: a second stream that did not wait
    for the caller would read stale inputs, and a caller that did not wait for it would
    see rows of the sparse half land after its own write."""
    monkeypatch.setenv("ISA_CONCURRENT_HALVES", "1")
    t_len = c_len = 8192
    gen = torch.Generator(device="cuda").manual_seed(1)
    weight = torch.randn(4096, 4096, generator=gen, device="cuda", dtype=torch.bfloat16) / 64
    shape = (1, t_len + c_len, 8, 128)
    seeds = [torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3)]

    def inputs():
        slow = torch.randn(8192, 4096, generator=gen, device="cuda", dtype=torch.bfloat16)
        for _ in range(20):  # keep the stream busy for a while before q, k, v are written
            slow = slow @ weight
        return [s + 0 * slow[0, 0] for s in seeds]

    expected = editing_sparse_attention(*seeds, t_len, c_len, backend="triton")
    torch.cuda.synchronize()
    caller = torch.cuda.Stream()
    with torch.cuda.stream(caller):
        out = editing_sparse_attention(*inputs(), t_len, c_len, backend="triton")
        after = out.clone()
        out.fill_(float("nan"))
    caller.synchronize()
    torch.cuda.synchronize()
    assert torch.equal(after, expected)
    assert out.isnan().all()
