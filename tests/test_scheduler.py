"""The Flow-UniPC sampler: Wan's schedule, and accuracy on a flow with a closed-form solution."""
import math

import numpy as np
import pytest
import torch

from scheduler import FlowUniPCSampler, wan_sigmas


def wan_schedule_by_hand(steps: int, shift: float) -> tuple[list[float], list[int]]:
    """Wan 2.2's FlowUniPC schedule, written out in plain Python floats (float64)."""
    top = float(np.float32(0.999))
    sigmas, timesteps = [], []
    for i in range(steps):
        u = top - i * top / steps
        sigma = shift * u / (1.0 + (shift - 1.0) * u)
        sigmas.append(sigma)
        timesteps.append(math.trunc(sigma * 1000))
    return sigmas + [0.0], timesteps


@pytest.mark.parametrize("steps, shift", [(32, 6.0), (50, 5.0), (4, 1.0)])
def test_schedule_matches_wan_formula(steps, shift):
    sigmas, timesteps = wan_schedule_by_hand(steps, shift)
    sampler = FlowUniPCSampler(num_steps=steps, shift=shift)

    assert sampler.sigmas.dtype == torch.float32
    assert sampler.timesteps.dtype == torch.int64
    assert sampler.sigmas.tolist() == np.asarray(sigmas, dtype=np.float32).tolist()
    assert sampler.timesteps.tolist() == timesteps
    np.testing.assert_allclose(wan_sigmas(steps, shift), sigmas[:-1], rtol=0, atol=1e-15)


def test_default_schedule_is_32_steps_shift_6():
    sampler = FlowUniPCSampler()
    sigmas, timesteps = wan_schedule_by_hand(32, 6.0)
    assert len(sampler.timesteps) == 32
    assert sampler.timesteps.tolist() == timesteps
    assert timesteps[0] == 999 and sampler.sigmas[-1].item() == 0.0


def gaussian_flow(sampler: FlowUniPCSampler, seed: int = 0):
    """Data x_0 ~ N(mu, sd^2) per coordinate: the exact velocity and the exact ODE endpoint.

    With x_s = (1 - s) x_0 + s n, x_s is Gaussian with variance (1 - s)^2 sd^2 + s^2, the
    ideal flow prediction is (x_s - E[x_0 | x_s]) / s, and the probability-flow ODE carries
    the point (1 - s0) mu + sqrt(var(s0)) e at sigma s0 to mu + sd e at sigma 0.
    """
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(2, 3, 100, dtype=torch.float64, generator=gen)
    sd = torch.rand(2, 3, 100, dtype=torch.float64, generator=gen) + 0.5
    e = torch.randn(2, 3, 100, dtype=torch.float64, generator=gen)
    sigma_of = {int(t): float(s) for t, s in zip(sampler.timesteps, sampler.sigmas)}
    assert len(sigma_of) == len(sampler.timesteps)

    def velocity(x, t):
        s = sigma_of[int(t)]
        var = (1 - s) ** 2 * sd ** 2 + s ** 2
        x0 = mu + (1 - s) * sd ** 2 / var * (x - (1 - s) * mu)
        return (x - x0) / s

    s0 = float(sampler.sigmas[0])
    start = (1 - s0) * mu + ((1 - s0) ** 2 * sd ** 2 + s0 ** 2).sqrt() * e
    return velocity, start, mu + sd * e


def relative_error(steps: int, shift: float) -> float:
    sampler = FlowUniPCSampler(num_steps=steps, shift=shift)
    velocity, start, exact = gaussian_flow(sampler)
    calls = []
    out = sampler.sample(velocity, start, callback=calls.append)
    assert calls == list(range(steps))
    assert out.shape == start.shape and out.dtype == start.dtype
    return float((out - exact).norm() / exact.norm())


def test_integrates_gaussian_flow_accurately_with_defaults():
    assert relative_error(32, 6.0) < 1.5e-2


def test_second_order_convergence():
    coarse, fine = relative_error(32, 1.0), relative_error(64, 1.0)
    assert fine < 2e-3
    assert coarse / fine > 3.0  # order 2 gives about 4


def test_sampler_is_reusable():
    sampler = FlowUniPCSampler(num_steps=6)
    velocity, start, _ = gaussian_flow(sampler)
    first = sampler.sample(velocity, start)
    second = sampler.sample(velocity, start)
    assert torch.equal(first, second)


@pytest.mark.parametrize("steps, shift", [(0, 6.0), (-1, 6.0), (True, 6.0), (32, 0.0)])
def test_rejects_bad_schedule(steps, shift):
    with pytest.raises(ValueError):
        FlowUniPCSampler(num_steps=steps, shift=shift)
