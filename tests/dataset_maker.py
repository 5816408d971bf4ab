"""A real dataset made without models: prepare -> process_shard (real PNG / WAV media) -> finalize.

The run's pieces are the real ones (manifest validation on the tiny model set, the one schema, the writer,
the card); only the generator and ranker are replaced by a function that returns real pictures and sounds.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from PIL import Image

from pws_batch.batch.config import RunConfig
from pws_batch.batch.pair import PairRequest, PairResult, ScoredCandidate
from pws_batch.batch.run import finalize, prepare, process_shard

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


def media_result(request: PairRequest) -> PairResult:
    """What the actors return for one pair, with real media; candidate c scores 0.1 c (CLIP), 0.2 c (CLAP)."""
    n = request.params.num_candidates
    candidates = []
    for c in range(n):
        seed, kept = request.params.seed + c, n - c <= request.keep
        candidates.append(ScoredCandidate(c, seed, 0.1 * c + 0.01 * request.row, 0.2 * c, n - c, kept,
                                          png(seed) if kept else None, wav(seed) if kept else None))
    return PairResult(request, candidates, generate_s=1.0, rank_s=0.1, unet_evals=10 * n)


def make_dataset(manifest: str, out: str, shard_size: int = 2, audio_format: str = "wav", **defaults) -> dict:
    """Run a manifest through prepare / process_shard / finalize with `media_result` as the actors."""
    config = RunConfig().replace(engine={"models": "tiny"}, plan={"shard_size": shard_size, "audio_format": audio_format},
                                 defaults={"num_candidates": 3, "steps": 10, **defaults})
    logs: list[str] = []
    plan = prepare(manifest, out, config, log=logs.append)
    for shard in plan.todo:
        process_shard(out, plan.model_ids, shard,
                      lambda reqs: ([media_result(r) for r in reqs], {"host": "test", "worker": 0}),
                      audio_format=audio_format)
    summary = finalize(plan)
    summary["logs"] = logs
    return summary
