"""Stand-in actors with the real actors' interface and no models: for benchmarks and tests of the orchestration.

`StandInGenerator` takes `pair_seconds` per pair (sleeping, as a GPU-bound generator leaves the driver's CPU
free) and returns small real candidates (grayscale pictures and 16 kHz sounds derived from each seed);
`StandInRanker` scores them deterministically from their pixels and samples and encodes the kept ones' media
exactly as the real ranker does. Everything else -- the flow, the Prefect tasks, the engine's dispatch, the
writer -- is the real code.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pws_batch.batch.config import RunConfig
from pws_batch.batch.pair import PairRequest, PairResult, ScoredCandidate

FAIL_MARK = "standin-fail"  # a pair whose id contains this fails in the generator (to test failure paths)


@dataclass
class StandInCandidate:
    index: int
    seed: int
    image: np.ndarray  # uint8 [H, W]
    audio: np.ndarray  # float32 [samples] at 16 kHz


@dataclass
class StandInGeneration:
    candidates: list[StandInCandidate]
    unet_evals: dict[str, int] = field(default_factory=dict)
    unet_evals_minimum: int = 0


def _where() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": os.uname().nodename}


class StandInGenerator:
    def __init__(self, config: RunConfig, pair_seconds: float = 0.0, width: int = 64, samples: int = 1600):
        self.config, self.pair_seconds, self.width, self.samples = config, pair_seconds, width, samples
        self.pairs = 0

    def info(self) -> dict[str, Any]:
        return {"role": "generator", "model_loads": 0, "pairs": self.pairs, "load_s": 0.0, "device": "stand-in",
                **_where()}

    def generate(self, request: PairRequest) -> PairResult:
        t0 = time.perf_counter()
        self.pairs += 1
        if FAIL_MARK in request.pair_id:
            return PairResult.failed(request, "ValueError: a stand-in pair asked to fail", generator=_where())
        if self.pair_seconds:
            time.sleep(self.pair_seconds)
        candidates = []
        for i, seed in enumerate(request.params.candidate_seeds):
            rng = np.random.default_rng(seed)
            image = rng.integers(0, 256, size=(32, self.width), dtype=np.uint8)
            audio = (0.2 * np.sin(np.arange(self.samples) * (0.01 + 0.001 * (seed % 50)))).astype(np.float32)
            candidates.append(StandInCandidate(i, seed, image, audio))
        n = len(candidates)
        generated = StandInGeneration(candidates, {"image": n, "audio": n}, 2 * n)
        return PairResult(request, generated=generated, unet_evals=2 * n, unet_evals_minimum=2 * n,
                          generate_s=round(time.perf_counter() - t0, 4), generator=_where())


class StandInRanker:
    def __init__(self, config: RunConfig, **_ignored: Any):
        self.config = config
        self.pairs = 0

    def info(self) -> dict[str, Any]:
        return {"role": "ranker", "model_loads": 0, "pairs": self.pairs, "load_s": 0.0, "device": "stand-in",
                **_where()}

    def rank(self, pair: PairResult) -> PairResult:
        from pws_batch.batch.ranking import rank_candidates
        from pws_batch.core.media import png_bytes, wav_bytes

        if not pair.ok:
            return pair
        t0 = time.perf_counter()
        self.pairs += 1
        candidates = pair.generated.candidates
        clip = np.array([c.image.mean() / 255.0 for c in candidates])
        clap = np.array([float(np.abs(c.audio).mean()) for c in candidates])
        ranks = rank_candidates(clip, clap, self.config.ranking)
        scored = []
        for i, c in enumerate(candidates):
            kept = bool(ranks[i] <= pair.request.keep)
            scored.append(ScoredCandidate(c.index, c.seed, float(clip[i]), float(clap[i]), int(ranks[i]), kept,
                                          png_bytes(c.image) if kept else None, wav_bytes(c.audio) if kept else None))
        return PairResult(pair.request, scored, unet_evals=pair.unet_evals,
                          unet_evals_minimum=pair.unet_evals_minimum, generate_s=pair.generate_s,
                          rank_s=round(time.perf_counter() - t0, 4), generator=pair.generator, ranker=_where())
