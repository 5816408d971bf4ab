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
    # The adaptive budget: once `keep` candidates score at least these (CLIP and CLAP), the pair stops making
    # candidates. None: no target on that score; both None: all `num_candidates` are made (the default).
    target_clip: float | None = None
    target_clap: float | None = None

    @property
    def adaptive(self) -> bool:
        return self.target_clip is not None or self.target_clap is not None

    def meets_targets(self, clip: float, clap: float) -> bool:
        """Whether a candidate's scores reach both targets (a score without a target always does)."""
        return (self.target_clip is None or clip >= self.target_clip) and \
            (self.target_clap is None or clap >= self.target_clap)


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


@dataclass(kw_only=True)
class _Work:
    """What the actors add to a request on its way: the error that stopped it, the U-Net counts, the timings and
    where it ran (host, pid, actor, GPUs)."""

    error: str | None = None
    unet_evals: int = 0
    unet_evals_minimum: int = 0
    generate_s: float = 0.0
    rank_s: float = 0.0
    generator: dict[str, Any] = field(default_factory=dict)
    ranker: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class PairResult(_Work):
    """What became of one request: every candidate scored and the best kept, or the error that stopped it."""

    request: PairRequest
    candidates: list[ScoredCandidate] = field(default_factory=list)

    @property
    def pair_id(self) -> str:
        return self.request.pair_id

    @property
    def stopped_early(self) -> bool:
        """The adaptive budget stopped the pair before its `num_candidates`."""
        return self.ok and len(self.candidates) < self.request.params.num_candidates

    @property
    def kept(self) -> list[ScoredCandidate]:
        """The kept candidates, best first."""
        return sorted((c for c in self.candidates if c.kept), key=lambda c: c.rank)

    @classmethod
    def failed(cls, request: PairRequest, error: str, **where: Any) -> "PairResult":
        return cls(request, error=error, **where)


@dataclass
class CandidateBatch(_Work):
    """One micro-batch of a pair's candidates, `start` .. `start + count - 1`: what streams from the generator to
    the ranker (`generated`: that micro-batch's arrays only, pws_batch.core.pipeline.GenerationResult) and from the
    ranker back (`scored`: their scores, and the media of those that may still be kept)."""

    request: PairRequest
    start: int
    count: int
    generated: Any = None
    scored: list[ScoredCandidate] = field(default_factory=list)
