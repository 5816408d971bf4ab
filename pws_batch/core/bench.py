"""`pws-batch bench sampler`: the batched sampler against the naive way, side by side in one process.

Only ratios measured in the same run are reported (these machines are noisy); nothing here asserts a time.
"""

from __future__ import annotations

import time
from collections import Counter

from pws_batch.core import sampler
from pws_batch.core.device import dtype_name
from pws_batch.core.params import GenerationParams


def bench_sampler(models: str = "tiny", candidates: int = 8, steps: int = 50, t_image: float = 0.9,
                  t_audio: float = 1.0, micro_batch: int = 8, device: str = "auto", dtype: str = "auto",
                  print_fn=print) -> dict:
    from pws_batch.core.pipeline import ImagesThatSoundPipeline, checked_timesteps

    pipe = ImagesThatSoundPipeline.from_model_set(models, device=device, dtype=dtype, vocoder="griffin-lim")
    params = GenerationParams("a painting of police cars", "police siren", num_candidates=candidates, steps=steps,
                              t_image=t_image, t_audio=t_audio, seed=0)
    timesteps, T = checked_timesteps(params, pipe.scheduler_config)
    branches = pipe.branches(params)
    minimum = sampler.minimum_unet_evals(timesteps, branches, T)
    seeds = params.candidate_seeds

    # Warm-up: the first call at each batch shape pays one-off costs (kernel selection, allocation).
    warm = GenerationParams(**{**params.to_dict(), "steps": 2})
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
    print_fn(f"{'way':<8} {'total_s':>9} {'s/candidate':>12} {'unet_evals/candidate':>21}")
    for name, secs, evals in rows:
        print_fn(f"{name:<8} {secs:>9.3f} {secs / candidates:>12.4f} {evals / candidates:>21.2f}")
    print_fn(f"{'minimum':<8} {'':>9} {'':>12} {minimum:>21.2f}")
    speedup = naive_s / batched_s
    of_minimum = sum(batched_evals.values()) / candidates / minimum
    print_fn(f"speedup {speedup:.2f}x, unet-evals {of_minimum:.2f} of minimum")
    return {"speedup": speedup, "unet_evals_of_minimum": of_minimum, "batched_s": batched_s, "naive_s": naive_s,
            "minimum_per_candidate": minimum, "batched_evals": dict(batched_evals), "naive_evals": dict(naive_evals)}


def _sync(device) -> None:
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        torch.cuda.synchronize()
