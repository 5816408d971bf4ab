"""A pair's request and its result: the two types that travel from the manifest through the actors to the writer.

Ray and Prefect carry them as they are (they pickle); nothing turns them into dicts on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pws_batch.core.params import GenerationParams


@dataclass
class PairRequest:
    """One good manifest row: what to generate, how many to keep, and the columns carried through."""

    row: int
    pair_id: str
    params: GenerationParams
    keep: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoredCandidate:
    """One candidate's seed, scores and rank; the media (PNG, WAV bytes) only for the kept ones."""

    candidate_index: int
    seed: int
    clip_score: float
    clap_score: float
    rank: int  # 1 = best under the run's ranking rule
    kept: bool
    image_png: bytes | None = None
    audio_wav: bytes | None = None


@dataclass
class PairResult:
    """What became of one request: every candidate scored and the best kept, or the error that stopped it.

    The generator fills `generated`, the U-Net counts and its timing; the ranker fills `candidates`.
    """

    request: PairRequest
    candidates: list[ScoredCandidate] = field(default_factory=list)
    error: str | None = None
    unet_evals: int = 0
    unet_evals_minimum: int = 0
    generate_s: float = 0.0
    rank_s: float = 0.0
    generator: dict[str, Any] = field(default_factory=dict)  # where it was generated (host, pid, actor, GPUs)
    ranker: dict[str, Any] = field(default_factory=dict)
    # Between generator and ranker only: the candidates' arrays (pws_batch.core.pipeline.GenerationResult).
    # The ranker scores them, encodes the kept ones' media and drops the rest.
    generated: Any = None

    @property
    def pair_id(self) -> str:
        return self.request.pair_id

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def kept(self) -> list[ScoredCandidate]:
        """The kept candidates, best first."""
        return sorted((c for c in self.candidates if c.kept), key=lambda c: c.rank)

    @classmethod
    def failed(cls, request: PairRequest, error: str, **where: Any) -> "PairResult":
        return cls(request, error=error, **where)
