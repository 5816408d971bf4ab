"""The composite sampler's math (docs/algorithm.md, "One denoising step" and "Guided generation"), with FAKE U-Nets.

Checks, against the spec's formulas computed independently here:
- classifier-free guidance per model, with cond and uncond batched into ONE U-Net call;
- the mixing weights w_x = a_x * H(t_x * T - t), lambda = w / sum(w), at every step of real DDIM schedules;
- skipping models whose weight is 0 (which U-Net is called at which timestep, and the eval counter);
- up-front rejection of schedules under which no model is active at some step (and its message);
- strength -> the timesteps run and the noise level of the guide latent at the first step run;
- that the composite loop reduces to a plain single-model DDIM loop when one base weight is 0, and to the
  lambda-weighted sum of both models' guided estimates otherwise.

The scheduler is diffusers' real DDIMScheduler built with Stable Diffusion 1.5's scheduler config.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from pws_batch.core import sampler
from pws_batch.core.params import GenerationParams
from pws_batch.core.schedule import make_scheduler
from pws_batch.core.sampler import Branch, ScheduleError

SD15_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                             steps_offset=1, prediction_type="epsilon")
T = 1000
LATENT = (4, 4, 8)  # small latents keep every test fast; the math does not depend on the size


def ddim():
    return make_scheduler("DDIMScheduler", SD15_SCHEDULER_CONFIG)


def full_schedule(steps: int) -> list[int]:
    s = ddim()
    s.set_timesteps(steps)
    return [int(t) for t in s.timesteps]


def exact_weight(t: int, t_x: float, a_x: float) -> float:
    """The spec's w_x(t) = a_x * H(t_x * T - t), H(x) = 1 if x >= 0, with t_x read as the exact decimal given."""
    return a_x if Fraction(str(t_x)) * T - t >= 0 else 0.0


# ------------------------------------------------------------------------------------------------ fakes
class RecordingUNet:
    """A fake U-Net: out = tanh(conv(sample) * (1 + e) + t / T), e = mean of the row's text embedding.

    Deterministic, nonlinear in z and t, and its output depends on which embedding each batch row got.
    Records every call (timestep, batch size, embeddings).
    """

    def __init__(self, seed: int, channels: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g) * 0.1)
        self.calls: list[dict] = []

    def __call__(self, sample, timestep, encoder_hidden_states=None):
        self.calls.append(dict(t=int(timestep), batch=sample.shape[0], dtype=sample.dtype,
                               emb=encoder_hidden_states.clone()))
        e = encoder_hidden_states.float().mean(dim=(1, 2))[:, None, None, None]
        with torch.no_grad():
            out = torch.tanh(self.conv(sample.float()) * (1 + e) + float(timestep) / T)
        return SimpleNamespace(sample=out.to(sample.dtype))

    @property
    def timesteps_called(self) -> list[int]:
        return [c["t"] for c in self.calls]


def embeddings(seed: int, tokens: int = 3, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, tokens, dim, generator=g) + 1.0
    uncond = torch.randn(1, tokens, dim, generator=g) - 1.0
    return cond, uncond


def make_branches(t_image=0.9, t_audio=1.0, a_image=0.5, a_audio=0.5, g_image=7.0, g_audio=3.0):
    ci, ui = embeddings(1)
    ca, ua = embeddings(2)
    image = Branch("image", RecordingUNet(11), ci, ui, g_image, t_image, a_image)
    audio = Branch("audio", RecordingUNet(22), ca, ua, g_audio, t_audio, a_audio)
    return image, audio


def cfg_by_hand(unet, z, t, cond, uncond, g):
    """Two separate U-Net calls, then eps_u + g * (eps_c - eps_u)."""
    b = z.shape[0]
    eps_c = unet(z, t, encoder_hidden_states=cond.expand(b, -1, -1)).sample
    eps_u = unet(z, t, encoder_hidden_states=uncond.expand(b, -1, -1)).sample
    return eps_u + g * (eps_c - eps_u)


# ------------------------------------------------------------------------------------------------ CFG
class ConstantPerEmbeddingUNet:
    """out[row] = k_row * sample[row] + c_row, where (k, c) = cond values if the row got the cond embedding."""

    def __init__(self, cond, k_cond, c_cond, k_uncond, c_uncond):
        self.cond, self.k_cond, self.c_cond, self.k_uncond, self.c_uncond = cond, k_cond, c_cond, k_uncond, c_uncond
        self.calls = []

    def __call__(self, sample, timestep, encoder_hidden_states=None):
        self.calls.append((sample.shape, encoder_hidden_states.shape, timestep))
        rows = []
        for i in range(sample.shape[0]):
            is_cond = torch.equal(encoder_hidden_states[i], self.cond[0])
            k, c = (self.k_cond, self.c_cond) if is_cond else (self.k_uncond, self.c_uncond)
            rows.append(k * sample[i] + c)
        return SimpleNamespace(sample=torch.stack(rows))


@pytest.mark.parametrize("batch", [1, 3])
def test_guidance_uses_each_models_own_scale_in_one_call(batch):
    z = torch.randn(batch, *LATENT, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(501)
    results = {}
    for name, g, seed, (kc, cc, ku, cu) in (("image", 7.5, 1, (2.0, 3.0, -1.0, 0.5)),
                                             ("audio", 2.0, 2, (0.5, -4.0, 1.5, 1.0))):
        cond, uncond = embeddings(seed)
        unet = ConstantPerEmbeddingUNet(cond, kc, cc, ku, cu)
        branch = Branch(name, unet, cond, uncond, g, 1.0, 0.5)
        eps = sampler.guided_noise_eps(branch, z, t)
        expected = (ku * z + cu) + g * ((kc * z + cc) - (ku * z + cu))
        torch.testing.assert_close(eps, expected, rtol=1e-5, atol=1e-5)
        # cond and uncond go through ONE call with batch 2B
        assert len(unet.calls) == 1
        sample_shape, emb_shape, _ = unet.calls[0]
        assert sample_shape[0] == 2 * batch
        assert emb_shape[0] == 2 * batch
        results[name] = eps
    # the two models got different scales, so their estimates differ
    assert not torch.allclose(results["image"], results["audio"])


def test_guidance_scale_1_is_the_conditional_estimate_and_0_the_unconditional():
    z = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(1))
    cond, uncond = embeddings(5)
    unet = ConstantPerEmbeddingUNet(cond, 2.0, 1.0, -3.0, 0.25)
    eps1 = sampler.guided_noise_eps(Branch("x", unet, cond, uncond, 1.0, 1.0, 0.5), z, torch.tensor(1))
    eps0 = sampler.guided_noise_eps(Branch("x", unet, cond, uncond, 0.0, 1.0, 0.5), z, torch.tensor(1))
    torch.testing.assert_close(eps1, 2.0 * z + 1.0)
    torch.testing.assert_close(eps0, -3.0 * z + 0.25)


def test_guided_noise_eps_feeds_the_unet_in_its_dtype_and_returns_float32():
    z = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(2))
    cond, uncond = embeddings(3)
    unet = RecordingUNet(4)
    branch = Branch("x", unet, cond.to(torch.bfloat16), uncond.to(torch.bfloat16), 5.0, 1.0, 0.5)
    eps = sampler.guided_noise_eps(branch, z, torch.tensor(500))
    assert unet.calls[0]["dtype"] == torch.bfloat16
    assert eps.dtype == torch.float32
    assert eps.shape == z.shape


# ------------------------------------------------------------------------------------------------ weights
PAIRS = [(0.9, 1.0), (1.0, 0.9), (0.5, 1.0), (1.0, 1.0), (0.3, 0.6), (0.891, 0.5)]
BASES = [(0.5, 0.5), (0.25, 0.75), (2.0, 1.0)]


@pytest.mark.parametrize("steps", [100, 50])
@pytest.mark.parametrize("t_image,t_audio", PAIRS)
@pytest.mark.parametrize("a_image,a_audio", BASES)
def test_mixing_weights_match_the_formula_at_every_step(steps, t_image, t_audio, a_image, a_audio):
    image, audio = make_branches(t_image, t_audio, a_image, a_audio)
    checked = 0
    for t in full_schedule(steps):
        w = [exact_weight(t, t_image, a_image), exact_weight(t, t_audio, a_audio)]
        assert image.weight(t, T) == w[0]
        assert audio.weight(t, T) == w[1]
        if sum(w) == 0:
            with pytest.raises(ScheduleError):
                sampler.mixing_weights(t, [image, audio], T)
            continue
        lambdas = sampler.mixing_weights(torch.tensor(t), [image, audio], T)
        assert lambdas == pytest.approx([w[0] / sum(w), w[1] / sum(w)], abs=1e-12)
        assert sum(lambdas) == pytest.approx(1.0)
        checked += 1
    assert checked > 0


def test_mixing_weights_default_schedule_joins_the_image_model_after_ten_percent():
    """Defaults t_image=0.9, t_audio=1.0 with 100 steps: the first 10 steps (991..901) are audio only."""
    image, audio = make_branches(0.9, 1.0)
    lambdas = [sampler.mixing_weights(t, [image, audio], T) for t in full_schedule(100)]
    assert [lam for lam in lambdas[:10]] == [[0.0, 1.0]] * 10
    assert all(lam == [0.5, 0.5] for lam in lambdas[10:])


def test_heaviside_at_exactly_t_x_times_T_counts_as_active():
    """H(0) = 1: with t_x = t / T the model is active at t (float rounding of t/T*T must not switch it off),
    and with t_x = (t - 1) / T it is not."""
    for t in sorted(set(full_schedule(100) + full_schedule(50) + [500, 900, 250, 700, 300, 600])):
        assert sampler.branch_weight(t, t / T, 0.5, T) == 0.5, t
        assert sampler.branch_weight(float(t), round(t / T, 3), 0.25, T) == 0.25, t
        assert sampler.branch_weight(torch.tensor(t), t / T, 0.5, T) == 0.5, t
        assert sampler.branch_weight(t, (t - 1) / T, 0.5, T) == 0.0, t
    assert sampler.heaviside(0.0) == 1.0
    assert sampler.heaviside(-1.0) == 0.0


# ------------------------------------------------------------------------------------------------ skipping
@pytest.mark.parametrize("t_image,t_audio,a_image,a_audio", [
    (0.5, 1.0, 0.5, 0.5),
    (1.0, 0.7, 0.25, 0.75),
    (0.9, 1.0, 0.0, 1.0),   # the image model is never active
    (1.0, 1.0, 0.5, 0.5),   # both always active
])
def test_inactive_models_are_not_evaluated(t_image, t_audio, a_image, a_audio):
    steps, batch = 20, 2
    image, audio = make_branches(t_image, t_audio, a_image, a_audio)
    scheduler = ddim()
    timesteps = sampler.run_timesteps(scheduler, steps, 1.0)
    z = torch.randn(batch, *LATENT, generator=torch.Generator().manual_seed(3))
    evals = Counter()
    seen = []
    out = sampler.denoise(z, timesteps, scheduler, [image, audio], T, skip_inactive=True, evals=evals,
                          callback=seen.append)
    assert seen == list(range(steps))
    assert out.shape == z.shape and torch.isfinite(out).all()

    ts = [int(t) for t in timesteps]
    for branch, t_x, a_x in ((image, t_image, a_image), (audio, t_audio, a_audio)):
        active = [t for t in ts if exact_weight(t, t_x, a_x) > 0]
        assert branch.unet.timesteps_called == active, branch.name  # called once per active step, in order
        assert all(c["batch"] == 2 * batch for c in branch.unet.calls)
        assert evals[branch.name] == len(active) * batch
    assert sum(evals.values()) == sampler.minimum_unet_evals(timesteps, [image, audio], T) * batch

    # the naive way evaluates every model at every step, multiplies by 0, and gets the same latents
    image2, audio2 = make_branches(t_image, t_audio, a_image, a_audio)
    scheduler2 = ddim()
    timesteps2 = sampler.run_timesteps(scheduler2, steps, 1.0)
    evals2 = Counter()
    out2 = sampler.denoise(z, timesteps2, scheduler2, [image2, audio2], T, skip_inactive=False, evals=evals2)
    for branch in (image2, audio2):
        assert branch.unet.timesteps_called == ts
        assert evals2[branch.name] == steps * batch
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)


def test_minimum_unet_evals_counts_active_models_per_step():
    image, audio = make_branches(0.5, 1.0)
    ts = full_schedule(100)
    expected = sum((exact_weight(t, 0.5, 0.5) > 0) + (exact_weight(t, 1.0, 0.5) > 0) for t in ts)
    assert sampler.minimum_unet_evals(ts, [image, audio], T) == expected
    assert 100 < expected < 200


# ------------------------------------------------------------------------------------------------ rejection
def test_all_off_schedule_is_rejected_with_first_timestep_and_fix():
    ts = full_schedule(100)
    with pytest.raises(ScheduleError) as info:
        sampler.check_schedule(ts, T, 0.5, 0.5)
    message = str(info.value)
    assert "991" in message
    assert "0.991" in message
    # raising either t to the value named fixes it; anything below it does not
    sampler.check_schedule(ts, T, 0.991, 0.5)
    sampler.check_schedule(ts, T, 0.5, 0.991)
    for fixed in ((0.99, 0.5), (0.5, 0.99), (0.9909, 0.9909)):
        with pytest.raises(ScheduleError):
            sampler.check_schedule(ts, T, *fixed)


def test_all_off_schedule_message_names_the_first_timestep_run_under_strength():
    """Guided generation with strength 0.9 starts at timestep 891: that is the one named."""
    scheduler = ddim()
    ts = [int(t) for t in sampler.run_timesteps(scheduler, 100, 0.9)]
    assert ts[0] == 891
    with pytest.raises(ScheduleError) as info:
        sampler.check_schedule(ts, T, 0.5, 0.8)
    assert "891" in str(info.value) and "0.891" in str(info.value)
    assert "991" not in str(info.value)
    sampler.check_schedule(ts, T, 0.5, 0.891)


def test_zero_base_weight_counts_as_off():
    """A model with a_x = 0 never contributes; if the other one is off somewhere the schedule is invalid."""
    ts = full_schedule(100)
    with pytest.raises(ScheduleError):
        sampler.check_schedule(ts, T, 1.0, 0.9, weight_image=0.0, weight_audio=0.5)
    sampler.check_schedule(ts, T, 1.0, 0.9, weight_image=0.5, weight_audio=0.0)


def test_strength_below_one_avoids_the_all_off_steps():
    """t_image = t_audio = 0.8: every step above 800 is all-off for strength 1, but strength 0.8 runs
    only the last 80 steps (791 and below), so it passes."""
    ts_full = full_schedule(100)
    with pytest.raises(ScheduleError):
        sampler.check_schedule(ts_full, T, 0.8, 0.8)
    scheduler = ddim()
    ts = [int(t) for t in sampler.run_timesteps(scheduler, 100, 0.8)]
    assert max(ts) <= 800
    sampler.check_schedule(ts, T, 0.8, 0.8)


def suggested_fix(message: str, name: str) -> float:
    import re

    match = re.search(rf"t_{name} >= ([0-9.]+(?:e-?[0-9]+)?)", message)
    assert match, message
    return float(match.group(1))


@pytest.mark.parametrize("scheduler_name,steps,strength", [
    ("DDIMScheduler", 100, 1.0),
    ("DDIMScheduler", 100, 0.9),
    ("DDIMScheduler", 50, 0.7),
    # Euler's first timestep 788.6842...: the printed fix must be rounded up, not to 6 significant digits.
    ("EulerDiscreteScheduler", 20, 0.8),
])
def test_the_suggested_t_is_the_smallest_that_fixes_the_schedule(scheduler_name, steps, strength):
    scheduler = make_scheduler(scheduler_name, SD15_SCHEDULER_CONFIG)
    ts = [float(t) for t in sampler.run_timesteps(scheduler, steps, strength)]
    with pytest.raises(ScheduleError) as info:
        sampler.check_schedule(ts, T, 0.3, 0.2)
    for name in ("image", "audio"):
        fix = suggested_fix(str(info.value), name)
        t_image, t_audio = (fix, 0.2) if name == "image" else (0.3, fix)
        sampler.check_schedule(ts, T, t_image, t_audio)  # the value named really fixes it
        with pytest.raises(ScheduleError):  # and a visibly smaller one does not
            sampler.check_schedule(ts, T, *((fix - 1e-3, 0.2) if name == "image" else (0.3, fix - 1e-3)))


@pytest.fixture
def no_models(monkeypatch):
    """check_request must never load a model: make every loader fail."""
    from pws_batch.core import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded while checking a request")

    from pws_batch.core import models

    for name in ("load_diffusion_pipeline", "load_vocoder", "resolve_model_set"):
        monkeypatch.setattr(pipeline, name, refuse)
    for name in ("load_diffusion_pipeline", "load_vocoder", "load_scheduler_config", "resolve_model_set"):
        monkeypatch.setattr(models, name, refuse)


def test_check_request_rejects_all_off_schedule_before_any_model(no_models):
    from pws_batch.core.pipeline import check_request

    params = GenerationParams(image_prompt="a lighthouse", audio_prompt="waves", t_image=0.5, t_audio=0.5)
    with pytest.raises(ScheduleError) as info:
        check_request(params, SD15_SCHEDULER_CONFIG)
    assert "991" in str(info.value) and "0.991" in str(info.value)
    check_request(GenerationParams(image_prompt="a lighthouse", audio_prompt="waves", t_image=0.991, t_audio=0.5),
                  SD15_SCHEDULER_CONFIG)
    check_request(GenerationParams(image_prompt="a lighthouse", audio_prompt="waves"), SD15_SCHEDULER_CONFIG)


def test_check_request_accepts_guided_schedule_that_skips_the_all_off_steps(no_models, tmp_path):
    import numpy as np
    import soundfile as sf

    from pws_batch.core.pipeline import check_request

    guide = tmp_path / "guide.wav"
    sf.write(guide, 0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000), 16000)
    ok = GenerationParams(image_prompt="ships", audio_prompt="birds", t_image=0.5, t_audio=0.8,
                          strength=0.8, guide_audio=str(guide))
    check_request(ok, SD15_SCHEDULER_CONFIG)
    with pytest.raises(ScheduleError):
        check_request(GenerationParams(**{**ok.to_dict(), "strength": 1.0}), SD15_SCHEDULER_CONFIG)



def test_check_request_without_guide_checks_the_steps_actually_run(no_models):
    """Without a guide the pipeline runs every step (strength only applies to a guide), so the up-front check
    must reject t_image = t_audio = 0.8, which switches both models off for the steps above 800."""
    from pws_batch.core.pipeline import check_request

    params = GenerationParams(image_prompt="ships", audio_prompt="birds", t_image=0.8, t_audio=0.8, strength=0.8)
    with pytest.raises(ValueError):
        check_request(params, SD15_SCHEDULER_CONFIG)

# ------------------------------------------------------------------------------------------------ strength
@pytest.mark.parametrize("steps", [100, 50, 7])
@pytest.mark.parametrize("strength", [1.0, 0.9, 0.8, 0.55, 0.3, 0.15])
def test_run_timesteps_runs_the_last_int_steps_times_strength(steps, strength):
    n = int(steps * strength)
    if n < 1:
        with pytest.raises(ScheduleError):
            sampler.run_timesteps(ddim(), steps, strength)
        return
    ts = [int(t) for t in sampler.run_timesteps(ddim(), steps, strength)]
    full = full_schedule(steps)
    assert len(ts) == n
    assert ts == full[steps - n:]
    if strength == 1.0:
        assert ts == full


def test_run_timesteps_with_no_step_is_refused():
    with pytest.raises(ScheduleError):
        sampler.run_timesteps(ddim(), 100, 0.001)


def alphas_cumprod_by_hand() -> torch.Tensor:
    """SD's "scaled_linear" betas: linspace(sqrt(b0), sqrt(b1), T) ** 2; alpha_bar = cumprod(1 - beta)."""
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.mark.parametrize("strength", [0.8, 0.5, 0.9])
def test_guide_is_noised_to_the_first_timestep_run(strength):
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(3, *LATENT, generator=g)
    guide = torch.randn(1, *LATENT, generator=g)
    scheduler = ddim()
    ts = sampler.run_timesteps(scheduler, 100, strength)
    t0 = int(ts[0])
    assert t0 == full_schedule(100)[100 - int(100 * strength)]

    ac = alphas_cumprod_by_hand()
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), ac, rtol=1e-5, atol=1e-6)

    z = sampler.initial_latents(noise, scheduler, ts, guide)
    expected = (math.sqrt(ac[t0]) * guide.double() + math.sqrt(1 - ac[t0]) * noise.double()).float()
    assert z.shape == noise.shape
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, scheduler.add_noise(guide.expand_as(noise), noise, ts[:1].repeat(3)))

    # NOT the old defect: the guide noised to t = T (the max timestep) whatever the strength
    for t_max in (T - 1, full_schedule(100)[0]):
        to_max = math.sqrt(ac[t_max]) * guide + math.sqrt(1 - ac[t_max]) * noise
        assert (z - to_max).abs().max() > 0.1
    # more of the guide survives than at the start of the full schedule
    ratio_guide = math.sqrt(ac[t0])
    assert ratio_guide > math.sqrt(ac[full_schedule(100)[0]])


def test_without_guide_the_latents_are_scaled_noise_and_all_steps_run():
    noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(8))
    scheduler = ddim()
    ts = sampler.run_timesteps(scheduler, 100, 1.0)
    assert len(ts) == 100 and int(ts[0]) == 991
    z = sampler.initial_latents(noise, scheduler, ts, None)
    torch.testing.assert_close(z, noise * scheduler.init_noise_sigma)


def test_guided_denoise_starts_from_the_noised_guide_and_runs_n_steps():
    """End to end with a fake: strength 0.6 of 30 steps -> 18 scheduler steps, first at timestep 401-ish."""
    image, audio = make_branches(1.0, 1.0)
    scheduler = ddim()
    ts = sampler.run_timesteps(scheduler, 30, 0.6)
    assert len(ts) == 18
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(2, *LATENT, generator=g)
    guide = torch.randn(1, *LATENT, generator=g)
    z0 = sampler.initial_latents(noise, scheduler, ts, guide)
    sampler.denoise(z0, ts, scheduler, [image, audio], T)
    assert audio.unet.timesteps_called == [int(t) for t in ts]
    assert image.unet.timesteps_called == [int(t) for t in ts]


# ------------------------------------------------------------------------------------------------ reduction
def plain_ddim_loop(unet, cond, uncond, g, z, steps, strength, guide=None):
    scheduler = ddim()
    scheduler.set_timesteps(steps)
    n = int(steps * strength)
    timesteps = scheduler.timesteps[steps - n:]
    if guide is not None:
        ac = alphas_cumprod_by_hand()
        t0 = int(timesteps[0])
        z = (math.sqrt(ac[t0]) * guide.double() + math.sqrt(1 - ac[t0]) * z.double()).float()
    for t in timesteps:
        eps = cfg_by_hand(unet, z, t, cond, uncond, g)
        z = scheduler.step(eps, t, z).prev_sample
    return z


@pytest.mark.parametrize("zero", ["image", "audio"])
@pytest.mark.parametrize("steps,strength", [(50, 1.0), (30, 0.6)])
def test_composite_with_one_zero_weight_is_a_plain_ddim_loop(zero, steps, strength):
    a_image, a_audio = (0.0, 0.5) if zero == "image" else (0.5, 0.0)
    image, audio = make_branches(0.9, 1.0, a_image, a_audio, g_image=6.0, g_audio=4.0)
    if zero == "audio":  # keep the remaining model active from the start
        image.t_start = 1.0
    off, on = (image, audio) if zero == "image" else (audio, image)

    g = torch.Generator().manual_seed(10)
    noise = torch.randn(3, *LATENT, generator=g)
    guide = torch.randn(1, *LATENT, generator=g) if strength < 1 else None

    scheduler = ddim()
    ts = sampler.run_timesteps(scheduler, steps, strength)
    z0 = sampler.initial_latents(noise, scheduler, ts, guide)
    evals = Counter()
    out = sampler.denoise(z0, ts, scheduler, [image, audio], T, evals=evals)

    reference_unet = RecordingUNet(11 if on is image else 22)  # same weights as `on`'s fake
    expected = plain_ddim_loop(reference_unet, on.cond, on.uncond, on.guidance, noise, steps, strength, guide)
    # the loop amplifies float32 rounding (the guide is noised in float64 here), hence a tolerance relative to
    # the latents' scale; a wrong noise level, weight or guidance gives differences of order 1
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert off.unet.calls == []
    assert evals[off.name] == 0 and evals[on.name] == int(steps * strength) * 3
    # the result really depends on the model and its guidance (the loop is not a no-op)
    assert (out - z0).abs().max() > 1e-2


def test_composite_is_the_lambda_weighted_sum_of_both_guided_estimates():
    t_image, t_audio, a_image, a_audio = 0.9, 1.0, 0.25, 0.75
    steps = 20
    image, audio = make_branches(t_image, t_audio, a_image, a_audio, g_image=8.0, g_audio=5.0)
    z0 = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(12))
    scheduler = ddim()
    ts = sampler.run_timesteps(scheduler, steps, 1.0)
    out = sampler.denoise(z0, ts, scheduler, [image, audio], T)

    ref_image, ref_audio = RecordingUNet(11), RecordingUNet(22)
    ref_scheduler = ddim()
    ref_scheduler.set_timesteps(steps)
    z = z0
    for t in ref_scheduler.timesteps:
        w_i, w_a = exact_weight(int(t), t_image, a_image), exact_weight(int(t), t_audio, a_audio)
        eps = (w_a / (w_i + w_a)) * cfg_by_hand(ref_audio, z, t, audio.cond, audio.uncond, 5.0)
        if w_i > 0:
            eps = eps + (w_i / (w_i + w_a)) * cfg_by_hand(ref_image, z, t, image.cond, image.uncond, 8.0)
        z = ref_scheduler.step(eps, t, z).prev_sample
    torch.testing.assert_close(out, z, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("steps,strength", [(1, 1.0), (3, 1.0), (20, 0.8), (25, 0.5), (50, 1.0), (100, 0.9),
                                            (333, 0.3), (1000, 1.0)])
def test_the_torch_free_ddim_schedule_is_diffusers_own(spacing, offset, steps, strength):
    """Validation computes DDIM's timesteps with numpy (pws_batch.core.schedule): they must be exactly the ones
    diffusers' DDIMScheduler runs, for every timestep_spacing."""
    from pws_batch.core.schedule import schedule_timesteps

    config = {**SD15_SCHEDULER_CONFIG, "timestep_spacing": spacing, "steps_offset": offset}
    expected = [float(t) for t in sampler.run_timesteps(make_scheduler("DDIMScheduler", config), steps, strength)]
    assert schedule_timesteps("DDIMScheduler", config, steps, strength) == (expected, T)


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0),
                                            ("linspace", 1)])
@pytest.mark.parametrize("steps,strength", [(1, 1.0), (3, 1.0), (20, 0.8), (25, 0.5), (50, 1.0), (100, 0.9),
                                            (333, 0.3), (1000, 1.0), (1200, 1.0)])
def test_the_torch_free_euler_schedule_is_diffusers_own(spacing, offset, steps, strength):
    """EulerDiscreteScheduler's timesteps (floats under linspace) are computed with numpy too: exactly the ones
    diffusers runs, for every timestep_spacing, from SD 1.5's config and from an empty one (Euler's defaults)."""
    from pws_batch.core.schedule import schedule_timesteps

    for config in ({**SD15_SCHEDULER_CONFIG, "timestep_spacing": spacing, "steps_offset": offset},
                   {"timestep_spacing": spacing}):
        expected = [float(t) for t in sampler.run_timesteps(make_scheduler("EulerDiscreteScheduler", config), steps,
                                                            strength)]
        assert schedule_timesteps("EulerDiscreteScheduler", config, steps, strength) == (expected, T)


@pytest.mark.parametrize("option", [{"use_karras_sigmas": True}, {"use_exponential_sigmas": True},
                                    {"timestep_type": "continuous", "prediction_type": "v_prediction"}])
def test_an_euler_config_whose_timesteps_come_from_its_sigmas_is_left_to_diffusers(option):
    from pws_batch.core.schedule import euler_timesteps, schedule_timesteps

    config = {**SD15_SCHEDULER_CONFIG, **option}
    assert euler_timesteps(config, 30) is None
    expected = [float(t) for t in sampler.run_timesteps(make_scheduler("EulerDiscreteScheduler", config), 30, 0.7)]
    assert schedule_timesteps("EulerDiscreteScheduler", config, 30, 0.7) == (expected, T)
    assert expected != schedule_timesteps("EulerDiscreteScheduler", SD15_SCHEDULER_CONFIG, 30, 0.7)[0]


def test_the_torch_free_ddim_schedule_takes_ddims_defaults_for_missing_keys():
    """SD 1.5 ships a PNDMScheduler config: keys DDIM lacks are ignored, keys it has but the config lacks take
    DDIMScheduler's defaults, as `DDIMScheduler.from_config` does."""
    from pws_batch.core.schedule import schedule_timesteps

    for config in ({}, {"num_train_timesteps": 500, "skip_prk_steps": True, "_class_name": "PNDMScheduler"}):
        expected = [float(t) for t in sampler.run_timesteps(make_scheduler("DDIMScheduler", config), 30, 1.0)]
        assert schedule_timesteps("DDIMScheduler", config, 30, 1.0)[0] == expected
    with pytest.raises(ValueError, match="cannot be larger"):
        schedule_timesteps("DDIMScheduler", {}, 1001, 1.0)
