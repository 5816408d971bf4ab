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
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pws_batch.batch.config import RunConfig
from pws_batch.batch.pair import CandidateBatch, PairRequest
from pws_batch.batch.stream import Seen, score_batch

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
        self.pairs = self.batches = self.largest_batch = 0

    def info(self) -> dict[str, Any]:
        return {"role": "generator", "model_loads": 0, "pairs": self.pairs, "load_s": 0.0, "device": "stand-in",
                "micro_batches": self.batches, "largest_micro_batch": self.largest_batch, **_where()}

    def _make(self, request: PairRequest, start: int, count: int) -> StandInGeneration:
        candidates = []
        for i, seed in enumerate(request.params.candidate_seeds[start:start + count], start):
            rng = np.random.default_rng(seed)
            image = rng.integers(0, 256, size=(32, self.width), dtype=np.uint8)
            audio = (0.2 * np.sin(np.arange(self.samples) * (0.01 + 0.001 * (seed % 50)))).astype(np.float32)
            candidates.append(StandInCandidate(i, seed, image, audio))
        n = len(candidates)
        return StandInGeneration(candidates, {"image": n, "audio": n}, 2 * n)

    def generate_batch(self, request: PairRequest, start: int, count: int) -> CandidateBatch:
        """One micro-batch, taking its share of `pair_seconds` (count / num_candidates of it)."""
        t0 = time.perf_counter()
        self.batches += 1
        self.largest_batch = max(self.largest_batch, count)
        if start == 0:
            self.pairs += 1
        if FAIL_MARK in request.pair_id:
            return CandidateBatch(request, start, count, error="ValueError: a stand-in pair asked to fail",
                                  generator=_where())
        if self.pair_seconds:
            time.sleep(self.pair_seconds * count / request.params.num_candidates)
        generated = self._make(request, start, count)
        return CandidateBatch(request, start, count, generated=generated, unet_evals=2 * count,
                              unet_evals_minimum=2 * count, generate_s=round(time.perf_counter() - t0, 4),
                              generator=_where())


class StandInRanker:
    def __init__(self, config: RunConfig, **_ignored: Any):
        import PIL.Image  # noqa: F401 - imported up front, as the real ranker loads its models up front
        import soundfile  # noqa: F401

        self.config = config
        self.pairs = 0

    def info(self) -> dict[str, Any]:
        return {"role": "ranker", "model_loads": 0, "pairs": self.pairs, "load_s": 0.0, "device": "stand-in",
                **_where()}

    @staticmethod
    def scores(candidates: list) -> tuple[np.ndarray, np.ndarray]:
        """Deterministic stand-in scores in [0, 1]: a picture's mean brightness, a sound's mean amplitude x 5."""
        return (np.array([c.image.mean() / 255.0 for c in candidates]),
                np.array([5 * float(np.abs(c.audio).mean()) for c in candidates]))

    def rank_batch(self, batch: CandidateBatch, seen: Seen) -> CandidateBatch:
        from pws_batch.core.media import png_bytes, wav_bytes

        if not batch.ok:
            return batch
        t0 = time.perf_counter()
        self.pairs += batch.start == 0
        clip, clap = self.scores(batch.generated.candidates)
        scored = score_batch(batch, clip, clap, seen, lambda c: (png_bytes(c.image), wav_bytes(c.audio)),
                             self.config.ranking)
        return replace(batch, generated=None, scored=scored, rank_s=round(time.perf_counter() - t0, 4),
                       ranker=_where())
