"""A real dataset made without models: prepare -> process_shard (real PNG / WAV media) -> finalize.

The run's pieces are the real ones (manifest validation on the tiny model set, the one schema, the writer,
the card); only the generator and ranker are replaced by a function that returns real pictures and sounds.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from PIL import Image

from pws_batch.batch.run import RunConfig, finalize, prepare, process_shard

WIDTH, HEIGHT, RATE = 992, 256, 16000


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, WIDTH, dtype=np.float64)[None, :].repeat(HEIGHT, 0)
    pixels = np.clip(gradient * 0.7 + rng.integers(0, 76, (HEIGHT, WIDTH)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def wav(seed: int, seconds: float = 1.0) -> bytes:
    t = np.arange(int(RATE * seconds)) / RATE
    samples = 0.3 * np.sin(2 * np.pi * (220 + 20 * seed) * t)
    buffer = io.BytesIO()
    sf.write(buffer, samples.astype(np.float32), RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def media_result(request) -> dict:
    """What the actors return for one pair, with real media; candidate c scores 0.1 c (CLIP), 0.2 c (CLAP)."""
    n = request.params.num_candidates
    seed0 = request.params.seed
    scores = [{"pair_id": request.pair_id, "candidate_index": c, "seed": seed0 + c, "clip_score": 0.1 * c + 0.01 * request.row,
               "clap_score": 0.2 * c, "rank": n - c, "kept": n - c <= request.keep} for c in range(n)]
    kept = [{"candidate_index": s["candidate_index"], "seed": s["seed"], "rank": s["rank"],
             "clip_score": s["clip_score"], "clap_score": s["clap_score"],
             "image_png": png(s["seed"]), "audio_wav": wav(s["seed"])}
            for s in sorted(scores, key=lambda s: s["rank"]) if s["kept"]]
    return {"kept": kept, "scores": scores, "generate_s": 1.0, "rank_s": 0.1, "unet_evals": 10 * n}


def make_dataset(manifest: str, out: str, shard_size: int = 2, **config) -> dict:
    """Run a manifest through prepare / process_shard / finalize with `media_result` as the actors."""
    config = RunConfig(manifest=manifest, out=out, models="tiny", shard_size=shard_size,
                       **{"num_candidates": 3, "steps": 10, **config})
    logs: list[str] = []
    plan = prepare(config, log=logs.append)
    for shard in plan.todo:
        process_shard(config, plan.model_ids, shard,
                      lambda reqs: ([media_result(r) for r in reqs], {"host": "test", "actor_pair": 0}))
    summary = finalize(plan)
    summary["logs"] = logs
    return summary
