"""The composite sampler: one latent denoised by two diffusion models (docs/algorithm.md, "One denoising step").

Small pure functions over tensors and one loop you can read whole. No Ray, no Prefect, no model loading:
the U-Nets come in as callables `unet(sample, timestep, encoder_hidden_states=...) -> object with .sample`
(diffusers' `UNet2DConditionModel` is one; tests pass fakes whose outputs they choose).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

# The schedule's torch-free half, used here and re-exported (pws_batch.core.schedule).
from pws_batch.core.schedule import ScheduleError, branch_weight, check_schedule, heaviside, steps_run  # noqa: F401


@dataclass
class Branch:
    """One diffusion model's part in the composite: its U-Net, prompt embeddings, CFG scale and schedule."""

    name: str
    unet: Callable[..., Any]
    cond: torch.Tensor  # [1, tokens, dim]: the prompt's embedding
    uncond: torch.Tensor  # [1, tokens, dim]: the negative prompt's embedding
    guidance: float
    t_start: float  # t_x in [0, 1]: the model joins once the timestep is <= t_x * T
    base_weight: float  # a_x

    def weight(self, t: float, num_train_timesteps: int) -> float:
        return branch_weight(t, self.t_start, self.base_weight, num_train_timesteps)


def mixing_weights(t: float, branches: Sequence[Branch], num_train_timesteps: int) -> list[float]:
    """lambda_x = w_x / sum(w): the share of each model's noise estimate at timestep t."""
    weights = [b.weight(t, num_train_timesteps) for b in branches]
    total = sum(weights)
    if total <= 0:
        raise ScheduleError(f"no model is active at timestep {float(t):g}")
    return [w / total for w in weights]


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps = eps(uncond) + g * (eps(cond) - eps(uncond))."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def minimum_unet_evals(timesteps: Sequence[float], branches: Sequence[Branch], num_train_timesteps: int) -> int:
    """U-Net evaluations one candidate needs: one per model that has a non-zero weight at each step."""
    return sum(1 for t in timesteps for b in branches if b.weight(t, num_train_timesteps) > 0)


def guided_noise_eps(branch: Branch, z_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One model's classifier-free-guided noise estimate: cond and uncond in ONE U-Net call."""
    unet_dtype = branch.cond.dtype
    batch = z_in.shape[0]
    embeddings = torch.cat([branch.uncond.expand(batch, -1, -1), branch.cond.expand(batch, -1, -1)])
    out = branch.unet(torch.cat([z_in, z_in]).to(unet_dtype), t, encoder_hidden_states=embeddings).sample
    eps_uncond, eps_cond = out.float().chunk(2)
    return classifier_free_guidance(eps_uncond, eps_cond, branch.guidance)


def denoise(z: torch.Tensor, timesteps: Sequence[torch.Tensor], scheduler: Any, branches: Sequence[Branch],
            num_train_timesteps: int, *, skip_inactive: bool = True, evals: Counter | None = None,
            callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """The composite denoising loop over a batch of latents `z` (float32, [B, 4, H, W]).

    At each timestep: mixing weights from the schedule, each active model's CFG estimate, their weighted
    sum, one scheduler step. With `skip_inactive`, a model whose weight is 0 is not evaluated at all (the
    naive way evaluates it and multiplies by 0). `evals` counts U-Net evaluations per model and candidate.
    """
    batch = z.shape[0]
    for i, t in enumerate(timesteps):
        lambdas = mixing_weights(t, branches, num_train_timesteps)
        z_in = scheduler.scale_model_input(z, t)
        eps = torch.zeros_like(z)
        for branch, lam in zip(branches, lambdas):
            if lam == 0 and skip_inactive:
                continue
            eps = eps + lam * guided_noise_eps(branch, z_in, t)
            if evals is not None:
                evals[branch.name] += batch
        z = scheduler.step(eps, t, z).prev_sample
        if callback is not None:
            callback(i)
    return z


def run_timesteps(scheduler: Any, steps: int, strength: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Set the scheduler up for `steps` steps and return the timesteps actually run for `strength`.

    `n = int(steps * strength)` steps are run: the last n of the full schedule (strength 1 runs them all); for
    DDIMScheduler these are the timesteps `pws_batch.core.schedule.schedule_timesteps` computes without torch.
    """
    n = steps_run(steps, strength)
    scheduler.set_timesteps(steps, device=device)
    start = (steps - n) * getattr(scheduler, "order", 1)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def initial_latents(noise: torch.Tensor, scheduler: Any, timesteps: torch.Tensor,
                    guide_latent: torch.Tensor | None) -> torch.Tensor:
    """Pure noise, or the guide's latent noised to the FIRST timestep actually run."""
    if guide_latent is None:
        return noise * scheduler.init_noise_sigma
    first = timesteps[:1].repeat(noise.shape[0])
    return scheduler.add_noise(guide_latent.expand_as(noise).to(noise.dtype), noise, first)
