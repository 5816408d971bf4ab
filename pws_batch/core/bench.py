"""`pws-batch bench sampler`: the batched sampler against the naive way, side by side in one process.

With `architecture="sd15"` the models are U-Nets and VAEs in the real SD 1.5 / Auffusion architectures with
random weights (built from reference_configs/sd15.json, nothing downloaded): the real cost of a candidate, in
fp16 on CUDA (fp32 on CPU), before any weights are fetched.

Only ratios measured in the same run are reported (these machines are noisy); nothing here asserts a time.
"""

from __future__ import annotations

import time
from collections import Counter

from pws_batch.core import sampler
from pws_batch.core.device import dtype_name
from pws_batch.core.params import GenerationParams


ARCHITECTURES = ("sd15",)


def build_unet_vae(architecture: str = "sd15", device="cpu", dtype=None, seed: int = 0):
    """A U-Net and a VAE in the real architecture (reference_configs/sd15.json, the configs SD 1.5 publishes;
    Auffusion keeps them), with random weights: nothing is downloaded."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from pws_batch.core.model_files import reference_config

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}: use one of {', '.join(ARCHITECTURES)}")
    config = reference_config("sd15")
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    from diffusers.utils import logging as diffusers_logging

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(strip(config["unet"]))
    vae = AutoencoderKL.from_config(strip(config["vae"]))
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # not the "keep modules in float32: []" notice of a plain cast
    try:
        return tuple(m.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False) for m in (unet, vae))
    finally:
        diffusers_logging.set_verbosity(verbosity)


def architecture_pipeline(architecture: str, device: str = "auto", dtype: str = "auto"):
    """An ImagesThatSoundPipeline whose image and audio models are random-weight U-Nets and VAEs in the real
    architectures, with SD 1.5's scheduler config, and random prompt embeddings in place of text encoders."""
    from types import SimpleNamespace

    from pws_batch.core.device import resolve_device, resolve_dtype
    from pws_batch.core.model_files import reference_config
    from pws_batch.core.models import ModelSet
    from pws_batch.core.pipeline import ImagesThatSoundPipeline

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    pipes = []
    for seed in (0, 1):  # image (SD 1.5), audio (Auffusion: the same architecture)
        unet, vae = build_unet_vae(architecture, dev, dt, seed=seed)
        pipes.append(SimpleNamespace(unet=unet, vae=vae))
    names = ModelSet(f"random-{architecture}", *[f"random weights, {architecture} architecture"] * 5)
    scheduler = {k: v for k, v in reference_config("sd15")["scheduler"].items() if k != "_class_name"}
    return ImagesThatSoundPipeline(pipes[0], pipes[1], None, names, dev, dt, scheduler)


def random_branches(pipe, params: GenerationParams) -> list:
    """The two models' branches with random [1, 77, 768] prompt embeddings (what the text encoders would give)."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for name, model, guidance, t_start, weight in (
            ("image", pipe.image_pipe, params.guidance_image, params.t_image, params.weight_image),
            ("audio", pipe.audio_pipe, params.guidance_audio, params.t_audio, params.weight_audio)):
        dim = model.unet.config.cross_attention_dim
        cond, uncond = (torch.randn(1, 77, dim, generator=g).to(pipe.device, pipe.dtype) for _ in range(2))
        out.append(sampler.Branch(name, model.unet, cond, uncond, guidance, t_start, weight))
    return out


def bench_sampler(models: str = "tiny", candidates: int = 8, steps: int = 50, t_image: float = 0.9,
                  t_audio: float = 1.0, micro_batch: int = 8, device: str = "auto", dtype: str = "auto",
                  print_fn=print, architecture: str | None = None) -> dict:
    from pws_batch.core.pipeline import ImagesThatSoundPipeline, checked_timesteps

    params = GenerationParams("a painting of police cars", "police siren", num_candidates=candidates, steps=steps,
                              t_image=t_image, t_audio=t_audio, seed=0)
    if architecture:
        pipe = architecture_pipeline(architecture, device=device, dtype=dtype)
        models = f"random weights in the {architecture} architecture"
        branches = random_branches(pipe, params)
    else:
        pipe = ImagesThatSoundPipeline.from_model_set(models, device=device, dtype=dtype, vocoder="griffin-lim")
        branches = pipe.branches(params)
    timesteps, T = checked_timesteps(params, pipe.scheduler_config)
    minimum = sampler.minimum_unet_evals(timesteps, branches, T)
    seeds = params.candidate_seeds

    # Warm-up: the first call at each batch shape pays one-off costs (kernel selection, allocation).
    warm = GenerationParams(**{**params.to_dict(), "steps": min(steps, 2)})
    pipe.denoise_latents(warm, seeds[:micro_batch], micro_batch=micro_batch, branches=branches)
    pipe.denoise_latents(warm, seeds[:1], micro_batch=1, branches=branches, skip_inactive=False)

    def timed(fn):
        _sync(pipe.device)
        t0 = time.perf_counter()
        fn()
        _sync(pipe.device)
        return time.perf_counter() - t0

    batched_evals, naive_evals = Counter(), Counter()
    batched_s = timed(lambda: pipe.denoise_latents(params, seeds, micro_batch=micro_batch, branches=branches,
                                                   evals=batched_evals))
    naive_s = timed(lambda: [pipe.denoise_latents(params, [s], micro_batch=1, branches=branches,
                                                  skip_inactive=False, evals=naive_evals) for s in seeds])
    rows = [("batched", batched_s, sum(batched_evals.values())), ("naive", naive_s, sum(naive_evals.values()))]
    print_fn(f"pws-batch bench sampler: models={models} device={pipe.device} dtype={dtype_name(pipe.dtype)} "
             f"candidates={candidates} steps={steps} micro_batch={micro_batch} t_image={t_image:g} t_audio={t_audio:g}")
    print_fn(f"{'way':<8} {'total_s':>9} {'s/candidate':>12} {'s/100-step candidate':>21} {'unet_evals/candidate':>21}")
    for name, secs, evals in rows:
        print_fn(f"{name:<8} {secs:>9.3f} {secs / candidates:>12.4f} {secs / candidates * 100 / steps:>21.3f} "
                 f"{evals / candidates:>21.2f}")
    print_fn(f"{'minimum':<8} {'':>9} {'':>12} {'':>21} {minimum:>21.2f}")
    speedup = naive_s / batched_s
    of_minimum = sum(batched_evals.values()) / candidates / minimum
    print_fn(f"speedup {speedup:.2f}x, unet-evals {of_minimum:.2f} of minimum")
    return {"speedup": speedup, "seconds_per_100_step_candidate": batched_s / candidates * 100 / steps, "unet_evals_of_minimum": of_minimum, "batched_s": batched_s, "naive_s": naive_s,
            "minimum_per_candidate": minimum, "batched_evals": dict(batched_evals), "naive_evals": dict(naive_evals)}


def _sync(device) -> None:
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        torch.cuda.synchronize()
