"""Flow-UniPC sampler with Wan 2.2's exact schedule (docs/pipeline.md, section 3, step 4).

Wan samples its flow-matching models with a UniPC multistep solver (bh2, order 2,
data prediction) on this schedule for N steps and shift s:

    u_i     = linspace(0.999, 0, N + 1)[i]    i < N, in float64 (0.999 taken as float32)
    sigma_i = s * u_i / (1 + (s - 1) * u_i)
    t_i     = int(sigma_i * 1000)             (truncated, the model's timestep input)
    sigma_N = 0

diffusers' `UniPCMultistepScheduler` (flow sigmas, flow prediction, bh2, order 2) runs the
same solver; given these sigmas with its own shift set to 1 (an identity map) it
reproduces Wan's sampler bit for bit: the sigmas are cast to float32 and the timesteps
truncated to int64 exactly as Wan does.

The noise convention is flow matching: x_sigma = (1 - sigma) * x_0 + sigma * noise, and
the model predicts the velocity v = noise - x_0.

No DPM++ option: diffusers' `DPMSolverMultistepScheduler.set_timesteps` accepts no custom
sigmas, and its own flow grid starts at shift(0.999) and ends at shift(1/N), whereas Wan's
flow DPM++ runs on shift(linspace(1, 0, N + 1)[:N]); it does not reproduce Wan's sampler.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

WAN_SIGMA_MAX = float(np.float32(0.999))  # Wan's largest training sigma, 1 - 1/1000 in float32
NUM_TRAIN_TIMESTEPS = 1000


def wan_sigmas(num_steps: int = 32, shift: float = 6.0) -> np.ndarray:
    """Wan's shifted sigmas for `num_steps` steps, float64 [num_steps] (the final 0 not included)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift!r}")
    u = np.linspace(WAN_SIGMA_MAX, 0.0, int(num_steps) + 1, dtype=np.float64)[:-1]
    return shift * u / (1.0 + (shift - 1.0) * u)


class FlowUniPCSampler:
    """Flow-UniPC (bh2, order 2) on Wan's schedule, backed by diffusers' UniPC solver.

    Attributes:
        sigmas: float32 [num_steps + 1], from about 1 down to 0.
        timesteps: int64 [num_steps], the timestep fed to the model at each step.
    """

    def __init__(self, num_steps: int = 32, shift: float = 6.0,
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        wan_sigmas(num_steps, shift)  # validates both
        self.num_steps = int(num_steps)
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self._solver = self._new_solver()
        self.sigmas = self._solver.sigmas.clone()
        self.timesteps = self._solver.timesteps.clone()

    def _new_solver(self):
        """A fresh diffusers UniPC solver (it keeps per-run history, so one per sampling run)."""
        from diffusers import UniPCMultistepScheduler

        solver = UniPCMultistepScheduler(
            num_train_timesteps=self.num_train_timesteps,
            solver_order=2,
            prediction_type="flow_prediction",
            predict_x0=True,
            solver_type="bh2",
            lower_order_final=True,
            use_flow_sigmas=True,
            flow_shift=1.0,  # the shift is already in the sigmas given below
            final_sigmas_type="zero",
        )
        solver.set_timesteps(sigmas=wan_sigmas(self.num_steps, self.shift))
        return solver

    def sample(
        self,
        velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise: torch.Tensor,
        callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Integrate the flow from `noise` (sigma about 1) to a clean sample (sigma 0).

        Args:
            velocity: v = velocity(x, timestep) with timestep an int64 scalar tensor; the
                model's flow prediction (noise - x_0) at x.
            noise: the starting latent [B, ...] (at least 2 dims, as diffusers' solver
                needs a batch axis); its dtype is kept between steps.
            callback: called with the step index after every step (progress bars).

        Returns:
            The sample at sigma 0, noise's shape and dtype.
        """
        solver = self._new_solver()
        x = noise
        for i, t in enumerate(solver.timesteps):
            v = velocity(x, t)
            x = solver.step(v, t, x, return_dict=False)[0]
            if callback is not None:
                callback(i)
        return x
