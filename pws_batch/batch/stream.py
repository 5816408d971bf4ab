"""A pair's candidates as a stream of micro-batches: made, scored and (with targets) stopped as they come.

The generator makes one micro-batch (`CandidateBatch.generated`: that micro-batch's arrays only), the ranker
scores it (`score_batch`) and keeps the media only of the candidates that may still be kept, and `PairStream`
gathers the scores on the driver. Once `keep` candidates meet the pair's targets (`--target-clip`,
`--target-clap` or the manifest's columns) the pair makes no more candidates. At the end the pair is ranked over
every candidate it made, exactly as a whole pair is ranked (`rank_candidates`), with the candidates that meet the
targets first when there are targets.

Memory does not grow with N: arrays exist one micro-batch at a time; what the driver holds per pair is every
candidate's two scores and the encoded media of the candidates fewer than `keep` others beat on both scores
(`dominators_below`; typically a handful). The micro-batch that ends a pair is ranked with the whole pair where it
is scored (`final_ranks`), and only its kept candidates are encoded at all.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from pws_batch.batch.pair import CandidateBatch, PairRequest, PairResult, ScoredCandidate
from pws_batch.batch.ranking import RankingRule, dominators_below, rank_with_targets


Seen = Sequence[tuple[float, float, bool]]  # a pair's scored candidates: (CLIP, CLAP, driver holds its media)


def score_batch(batch: CandidateBatch, clip: Sequence[float], clap: Sequence[float], seen: Seen,
                encode: Callable[[Any], tuple[bytes, bytes]], rule: RankingRule) -> list[ScoredCandidate]:
    """A micro-batch's scores, with the media (`encode(candidate) -> (png, wav)`) of the candidates that may still
    be kept. `seen` is what the driver knew of the pair's earlier candidates when it asked for this micro-batch
    (PairStream.seen: every scored one, in candidate order, and whether it holds its media).

    A candidate that `keep` held ones beat on both scores is never kept (`dominators_below`). When this micro-batch
    ends the pair (its last, or with targets the one after which `keep` candidates meet them) and every earlier
    candidate is scored, the pair's ranking is final here: only the candidates it keeps are encoded (with keep 1
    and one micro-batch, one instead of the handful no other candidate beats on both scores)."""
    candidates = batch.generated.candidates
    held = [(a, b) for a, b, holds in seen if holds]
    all_clip = np.array([h[0] for h in held] + [float(x) for x in clip])
    all_clap = np.array([h[1] for h in held] + [float(x) for x in clap])
    may_keep = dominators_below(all_clip, all_clap, batch.request.keep)[len(held):]
    final = final_ranks(batch, clip, clap, seen, rule)
    if final is not None:
        may_keep &= final <= batch.request.keep
    scored = []
    for i, c in enumerate(candidates):
        png, wav = encode(c) if may_keep[i] else (None, None)
        scored.append(ScoredCandidate(batch.start + i, c.seed, float(clip[i]), float(clap[i]), 0, False, png, wav))
    return scored


def final_ranks(batch: CandidateBatch, clip: Sequence[float], clap: Sequence[float], seen: Seen,
                rule: RankingRule) -> np.ndarray | None:
    """The ranks of a micro-batch's candidates in the pair's final ranking (PairStream.result), when this
    micro-batch ends the pair and `seen` holds every earlier candidate; else None (an earlier micro-batch still in
    flight, or more to come)."""
    request = batch.request
    if len(seen) != batch.start:  # seen holds candidates 0 .. len(seen) - 1: all before this batch, or not
        return None
    every_clip = np.array([s[0] for s in seen] + [float(x) for x in clip])
    every_clap = np.array([s[1] for s in seen] + [float(x) for x in clap])
    meets = (np.array([request.meets_targets(a, b) for a, b in zip(every_clip, every_clap)], dtype=bool)
             if request.adaptive else None)
    ends = batch.start + batch.count >= request.params.num_candidates or (
        meets is not None and int(meets.sum()) >= request.keep)  # as PairStream.add stops the pair
    return rank_with_targets(every_clip, every_clap, rule, meets)[batch.start:] if ends else None


class PairStream:
    """One pair on the driver: which micro-batch comes next, the scores so far, whether to stop."""

    def __init__(self, request: PairRequest, micro_batch: int):
        self.request = request
        n = request.params.num_candidates
        self.plan = [(s, min(micro_batch, n - s)) for s in range(0, n, micro_batch)]
        self.next = 0
        self.outstanding = 0
        self.scored: list[ScoredCandidate] = []
        self.error: str | None = None
        self.stopped = False
        self.unet_evals = self.unet_evals_minimum = 0
        self.generate_s = self.rank_s = 0.0
        self.generator: dict[str, Any] = {}
        self.ranker: dict[str, Any] = {}

    @property
    def finished(self) -> bool:
        return self.outstanding == 0 and (self.error is not None or self.stopped or self.next == len(self.plan))

    def can_submit(self) -> bool:
        """Another micro-batch may be queued: with targets, only once the last one is scored (no wasted work)."""
        if self.error is not None or self.stopped or self.next == len(self.plan):
            return False
        return not (self.request.adaptive and self.outstanding)

    def submit(self) -> tuple[int, int]:
        start, count = self.plan[self.next]
        self.next += 1
        self.outstanding += 1
        return start, count

    def _holding(self) -> list[ScoredCandidate]:
        """The candidates whose media the driver holds."""
        return [c for c in self.scored if c.image_png is not None]

    def held(self) -> list[tuple[float, float]]:
        """Scores of the candidates whose media the driver holds."""
        return [(c.clip_score, c.clap_score) for c in self._holding()]

    def seen(self) -> list[tuple[float, float, bool]]:
        """What the ranker needs to know of the pair's scored candidates (score_batch): in candidate order, their
        scores and whether the driver holds their media."""
        return [(c.clip_score, c.clap_score, c.image_png is not None)
                for c in sorted(self.scored, key=lambda c: c.candidate_index)]

    def add(self, batch: CandidateBatch) -> None:
        self.outstanding -= 1
        if self.error is not None:
            return
        if not batch.ok:
            self.error = batch.error
            self.generator, self.ranker = batch.generator or self.generator, batch.ranker or self.ranker
            return
        self.scored.extend(batch.scored)
        self.unet_evals += batch.unet_evals
        self.unet_evals_minimum += batch.unet_evals_minimum
        self.generate_s += batch.generate_s
        self.rank_s += batch.rank_s
        self.generator, self.ranker = batch.generator, batch.ranker
        held = self._holding()
        if held:
            may_keep = dominators_below(np.array([c.clip_score for c in held]),
                                        np.array([c.clap_score for c in held]), self.request.keep)
            for c, keep in zip(held, may_keep):
                if not keep:
                    c.image_png = c.audio_wav = None
        if self.request.adaptive:
            meeting = sum(self.request.meets_targets(c.clip_score, c.clap_score) for c in self.scored)
            self.stopped = meeting >= self.request.keep

    def result(self, rule: RankingRule) -> PairResult:
        where = {"generator": self.generator, "ranker": self.ranker}
        if self.error is not None:
            return PairResult.failed(self.request, self.error, **where)
        candidates = sorted(self.scored, key=lambda c: c.candidate_index)
        clip = np.array([c.clip_score for c in candidates])
        clap = np.array([c.clap_score for c in candidates])
        meets = (np.array([self.request.meets_targets(a, b) for a, b in zip(clip, clap)], dtype=bool)
                 if self.request.adaptive else None)
        ranks = rank_with_targets(clip, clap, rule, meets)
        for c, rank in zip(candidates, ranks):
            c.rank, c.kept = int(rank), bool(rank <= self.request.keep)
            if not c.kept:
                c.image_png = c.audio_wav = None
            elif c.image_png is None:  # cannot happen: a kept candidate is beaten on both scores by < keep others
                return PairResult.failed(self.request, f"internal error: kept candidate {c.candidate_index} has "
                                                       f"no media", **where)
        return PairResult(self.request, candidates, unet_evals=self.unet_evals,
                          unet_evals_minimum=self.unet_evals_minimum, generate_s=round(self.generate_s, 4),
                          rank_s=round(self.rank_s, 4), **where)
