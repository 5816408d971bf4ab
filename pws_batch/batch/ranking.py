"""Ranking rules: how a pair's CLIP and CLAP scores become one order (docs/algorithm.md, "Ranking the candidates").

The reference's rule (candidates in the top fraction by BOTH scores first), a weighted sum of min-max normalised
scores, and Pareto rank. Every rule gives a full order (rank 1 = best) so `keep` can be any number. The scorers
themselves live in `pws_batch.core.scorers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

RULES = ("reference", "weighted", "pareto")


# ---------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class RankingRule:
    """How two scores become one order. `top_fraction` is the reference rule's; weights the weighted sum's."""

    name: str = field(default="reference", metadata={
        "flag": "--ranking", "choices": RULES,
        "help": "reference: top fraction by both scores first; weighted: weighted sum of min-max normalised "
                "scores; pareto: Pareto front first"})
    top_fraction: float = field(default=0.2, metadata={"flag": "--top-fraction", "help": "the reference rule's fraction"})
    clip_weight: float = field(default=0.5, metadata={"flag": "--clip-weight",
                                                      "help": "weight of the CLIP score in the weighted sum"})
    clap_weight: float = field(default=0.5, metadata={"flag": "--clap-weight",
                                                      "help": "weight of the CLAP score in the weighted sum"})

    def __post_init__(self):
        if self.name not in RULES:
            raise ValueError(f"--ranking: unknown rule {self.name!r}: use one of {', '.join(RULES)}")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"--top-fraction must be in (0, 1], got {self.top_fraction}")
        weights = (self.clip_weight, self.clap_weight)
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) == 0:
            raise ValueError(f"--clip-weight and --clap-weight must be finite, >= 0 and not both 0, got {weights}")


def normalise(x: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] within one pair's candidates (all equal -> all 0)."""
    x = np.asarray(x, dtype=np.float64)
    span = x.max() - x.min() if x.size else 0.0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def top_set(x: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the top `fraction` (at least one) by x."""
    k = max(1, int(round(len(x) * fraction)))
    mask = np.zeros(len(x), dtype=bool)
    mask[np.argsort(-x, kind="stable")[:k]] = True
    return mask


def pareto_fronts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-dominated sorting: front 0 is the Pareto set of (a, b), both to maximise."""
    n = len(a)
    front = np.full(n, -1)
    remaining = set(range(n))
    level = 0
    while remaining:
        current = [i for i in remaining
                   if not any(a[j] >= a[i] and b[j] >= b[i] and (a[j] > a[i] or b[j] > b[i]) for j in remaining)]
        for i in current:
            front[i] = level
            remaining.discard(i)
        level += 1
    return front


def rank_candidates(clip: np.ndarray, clap: np.ndarray, rule: RankingRule = RankingRule()) -> np.ndarray:
    """1-based ranks (1 = best) of every candidate under `rule`; ties keep candidate order."""
    clip, clap = np.asarray(clip, dtype=np.float64), np.asarray(clap, dtype=np.float64)
    combined = rule.clip_weight * normalise(clip) + rule.clap_weight * normalise(clap)
    if rule.name == "weighted":
        primary = np.zeros(len(clip))
    elif rule.name == "reference":  # in the top fraction by both scores first
        primary = (~(top_set(clip, rule.top_fraction) & top_set(clap, rule.top_fraction))).astype(float)
    else:  # pareto
        primary = pareto_fronts(clip, clap).astype(float)
    order = np.lexsort((np.arange(len(clip)), -combined, primary))
    ranks = np.empty(len(clip), dtype=np.int64)
    ranks[order] = np.arange(1, len(clip) + 1)
    return ranks


# ---------------------------------------------------------------------------------------------- streaming
def dominators_below(clip: np.ndarray, clap: np.ndarray, keep: int, chunk: int = 1024) -> np.ndarray:
    """Mask of the candidates that fewer than `keep` others beat on BOTH scores (strictly).

    A candidate that `keep` others strictly beat on both scores ranks behind all of them under every rule
    (reference, weighted, pareto, and with the adaptive targets first), so it can never be kept: its media can be
    dropped as soon as it is seen. Counting only among the candidates still held is exact (a dropped candidate's
    beaters are held or beat by held ones), so a stream of micro-batches keeps only these.
    """
    clip, clap = np.asarray(clip, dtype=np.float64), np.asarray(clap, dtype=np.float64)
    counts = np.empty(len(clip), dtype=np.int64)
    for s in range(0, len(clip), chunk):  # rows in chunks: memory bounded by chunk x n booleans
        beats = (clip[None, :] > clip[s:s + chunk, None]) & (clap[None, :] > clap[s:s + chunk, None])
        counts[s:s + chunk] = beats.sum(axis=1)
    return counts < keep


def rank_with_targets(clip: np.ndarray, clap: np.ndarray, rule: RankingRule = RankingRule(),
                      meets: np.ndarray | None = None) -> np.ndarray:
    """`rank_candidates`, with the candidates that meet the adaptive targets (`meets`) before those that do not.

    Without `meets` (no targets), exactly `rank_candidates`.
    """
    ranks = rank_candidates(clip, clap, rule)
    if meets is None:
        return ranks
    order = np.lexsort((ranks, ~np.asarray(meets, dtype=bool)))
    out = np.empty(len(ranks), dtype=np.int64)
    out[order] = np.arange(1, len(ranks) + 1)
    return out
