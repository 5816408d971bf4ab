"""Streaming a pair micro-batch by micro-batch, and the adaptive budget (pws_batch.batch.stream, engine.run_pairs).

Without targets the stream keeps exactly the candidates a whole-pair ranking keeps, holding media only for those
that may still be kept; with targets a pair stops after the first micro-batch that meets them, and runs all N
when they are never met. The Ray tests use the stand-in actors on a real local Ray.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pws_batch.batch import engine
from pws_batch.batch.config import RunConfig
from pws_batch.batch.pair import CandidateBatch, PairRequest
from pws_batch.batch.ranking import RankingRule, dominators_below, rank_candidates, rank_with_targets
from pws_batch.batch.standins import StandInGenerator, StandInRanker
from pws_batch.batch.stream import PairStream, score_batch
from pws_batch.core.params import GenerationParams


def request(i: int, n: int = 20, keep: int = 2, **targets) -> PairRequest:
    return PairRequest(i, f"p{i}", GenerationParams(f"picture {i}", f"sound {i}", num_candidates=n, seed=100 * i),
                       keep=keep, **targets)


# ------------------------------------------------------------------------------------------------ pure
def test_dominators_below_matches_brute_force():
    rng = np.random.default_rng(0)
    for keep in (1, 2, 5):
        clip, clap = rng.random(200), rng.random(200)
        clip[::7] = clip[0]  # ties must not count as beating
        brute = np.array([sum((clip[j] > clip[i]) and (clap[j] > clap[i]) for j in range(200)) < keep
                          for i in range(200)])
        assert (dominators_below(clip, clap, keep, chunk=64) == brute).all()


def stream_in_batches(req: PairRequest, clip: np.ndarray, clap: np.ndarray, micro_batch: int,
                      rule: RankingRule, encoded: list[int] | None = None) -> tuple[PairStream, list[int]]:
    """Drive a PairStream as the engine does, scoring with `score_batch` from fixed scores (the candidate indices
    whose media are encoded go to `encoded`)."""
    stream, media_held = PairStream(req, micro_batch), []

    def encode(c):
        if encoded is not None:
            encoded.append(c.seed - req.params.seed)
        return b"png%d" % c.seed, b"wav%d" % c.seed

    while stream.can_submit():
        start, count = stream.submit()
        generated = SimpleNamespace(candidates=[SimpleNamespace(seed=req.params.seed + start + j)
                                                for j in range(count)])
        batch = CandidateBatch(req, start, count, generated=generated, unet_evals=2 * count)
        batch.scored = score_batch(batch, clip[start:start + count], clap[start:start + count], stream.seen(),
                                   encode, rule)
        stream.add(batch)
        media_held.append(len(stream.held()))
    return stream, media_held


@pytest.mark.parametrize("rule", [RankingRule(), RankingRule("weighted", clip_weight=0.0, clap_weight=1.0),
                                  RankingRule("pareto")])
@pytest.mark.parametrize("keep", [1, 3])
def test_stream_without_targets_keeps_what_a_whole_pair_ranking_keeps(rule, keep):
    rng = np.random.default_rng(keep)
    n = 37
    clip, clap = rng.random(n).round(2), rng.random(n).round(2)  # rounded: ties happen
    req = request(1, n=n, keep=keep)
    encoded: list[int] = []
    stream, held = stream_in_batches(req, clip, clap, micro_batch=5, rule=rule, encoded=encoded)
    result = stream.result(rule)
    assert result.ok and len(result.candidates) == n and not result.stopped_early
    expected = rank_candidates(clip, clap, rule)
    assert [c.rank for c in result.candidates] == list(expected)
    assert [c.seed for c in result.candidates] == req.params.candidate_seeds
    assert sorted(c.candidate_index for c in result.kept) == sorted(np.flatnonzero(expected <= keep).tolist())
    assert all(c.image_png == b"png%d" % c.seed for c in result.kept)
    assert all(c.image_png is None for c in result.candidates if not c.kept)
    assert result.unet_evals == 2 * n
    assert max(held) < n  # media was dropped along the way, not held for every candidate
    # the last micro-batch (35, 36) ends the pair with every earlier one scored: only its kept ones are encoded
    kept = {c.candidate_index for c in result.kept}
    assert {i for i in encoded if i >= 35} == {i for i in kept if i >= 35}


@pytest.mark.parametrize("rule", [RankingRule(), RankingRule("weighted"), RankingRule("pareto")])
@pytest.mark.parametrize("keep", [1, 2])
def test_a_pair_in_one_micro_batch_encodes_only_its_kept_candidates(rule, keep):
    rng = np.random.default_rng(10 + keep)
    n = 8
    clip = rng.random(n)
    clap = 1 - clip + rng.normal(0, 0.05, n)  # scores that disagree: most candidates on the Pareto front
    assert dominators_below(clip, clap, keep).sum() > keep  # beaten-on-both alone would encode more than keep
    encoded: list[int] = []
    stream, _ = stream_in_batches(request(3, n=n, keep=keep), clip, clap, micro_batch=n, rule=rule, encoded=encoded)
    result = stream.result(rule)
    assert result.ok and sorted(encoded) == sorted(c.candidate_index for c in result.kept) and len(encoded) == keep
    assert all(c.image_png == b"png%d" % c.seed for c in result.kept)


def test_final_ranking_waits_for_every_earlier_score():
    """A micro-batch asked for while an earlier one is still in flight (the engine's lookahead) cannot know the
    pair's final ranking: it keeps to the beaten-on-both rule."""
    from pws_batch.batch.stream import final_ranks

    req = request(4, n=10, keep=1)
    batch = CandidateBatch(req, 5, 5)
    scores = [0.5] * 5
    assert final_ranks(batch, scores, scores, [(0.1, 0.1, True)] * 4, RankingRule()) is None  # 4 of 5 seen
    assert list(final_ranks(batch, scores, scores, [(0.9, 0.9, True)] * 5, RankingRule())) == [6, 7, 8, 9, 10]
    assert final_ranks(CandidateBatch(req, 0, 5), scores, scores, [], RankingRule()) is None  # more to come


def test_targets_stop_the_pair_once_keep_candidates_meet_them():
    clip = np.array([0.1, 0.9, 0.95, 0.2, 0.99, 0.99, 0.99, 0.99])
    clap = np.array([0.9, 0.9, 0.1, 0.2, 0.99, 0.99, 0.99, 0.99])
    req = request(2, n=8, keep=1, target_clip=0.5, target_clap=0.5)  # candidate 1 meets both
    encoded: list[int] = []
    stream, _ = stream_in_batches(req, clip, clap, micro_batch=2, rule=RankingRule(), encoded=encoded)
    result = stream.result(RankingRule())
    assert stream.stopped and len(result.candidates) == 2 and result.stopped_early
    assert encoded == [1]  # the micro-batch that met the targets ended the pair: only its kept one encoded
    assert result.kept[0].candidate_index == 1 and result.unet_evals == 4
    # keep 2: candidate 4 (third micro-batch) is the second to meet both
    stream, _ = stream_in_batches(request(2, n=8, keep=2, target_clip=0.5, target_clap=0.5), clip, clap, 2,
                                  RankingRule())
    assert len(stream.scored) == 6
    # the candidates that meet the targets rank first even when the rule alone would put another first
    ranks = rank_with_targets(np.array([0.9, 0.6]), np.array([0.1, 0.6]), RankingRule("weighted", 1.0, 1.0, 0.0),
                              meets=np.array([False, True]))
    assert list(ranks) == [2, 1]


# ------------------------------------------------------------------------------------------------ on Ray
@pytest.fixture(scope="module")
def pool(local_ray):
    config = RunConfig().replace(engine={"actors": 1, "device": "cpu", "micro_batch": 4})
    pool = engine.start_actors(config, log=lambda line: None, generator_cls=StandInGenerator,
                               ranker_cls=StandInRanker)
    yield pool
    engine.stop_actors(pool)


def test_run_pairs_streams_one_micro_batch_at_a_time(pool):
    import ray

    requests = [request(i, n=16, keep=2) for i in range(3)]
    results, where = engine.run_pairs(pool, requests)
    assert [len(r.candidates) for r in results] == [16, 16, 16] and all(r.ok for r in results)
    assert where["micro_batches"] == 12 and where["micro_batches_in_flight_max"] <= engine.LOOKAHEAD
    info = ray.get(pool.workers[0].infos.remote())[0]
    assert info["largest_micro_batch"] == 4  # no call, and so no Ray object, holds more than one micro-batch
    # the same kept candidates and scores as ranking the whole pair at once (all 16 in one batch, in-process)
    from pws_batch.core.media import png_bytes

    whole = StandInGenerator(RunConfig()).generate_batch(requests[1], 0, 16).generated.candidates
    clip, clap = StandInRanker.scores(whole)
    ranks = rank_candidates(clip, clap, RankingRule())
    assert [(c.seed, c.clip_score, c.clap_score, c.rank, c.kept) for c in results[1].candidates] == \
        [(c.seed, clip[i], clap[i], ranks[i], bool(ranks[i] <= 2)) for i, c in enumerate(whole)]
    best = sorted(range(16), key=lambda i: ranks[i])[:2]
    assert [c.image_png for c in results[1].kept] == [png_bytes(whole[i].image) for i in best]


def test_adaptive_budget_stops_after_first_micro_batch_or_runs_all(pool):
    met = request(5, n=16, keep=1, target_clip=0.0, target_clap=0.0)
    never = request(6, n=16, keep=1, target_clip=1.01, target_clap=0.0)
    plain = request(7, n=16, keep=1)
    results, where = engine.run_pairs(pool, [met, never, plain])
    assert [len(r.candidates) for r in results] == [4, 16, 16]
    assert [r.stopped_early for r in results] == [True, False, False]
    assert results[0].unet_evals == 2 * 4 and results[1].unet_evals == 2 * 16
    assert len(results[0].kept) == 1 and results[0].kept[0].image_png.startswith(b"\x89PNG")


def test_streams_with_calls_in_flight_keep_what_a_whole_pair_ranking_keeps():
    """As the engine drives a pair: up to LOOKAHEAD micro-batches asked for before the earlier ones' scores are
    back (their `seen` is short, so only the last one in order may know the final ranking), targets or not, every
    rule. The kept candidates always have their media, and are the ones ranking what was made would keep."""
    rng = np.random.default_rng(7)
    rules = [RankingRule(), RankingRule("weighted", clip_weight=0.3, clap_weight=0.7), RankingRule("pareto")]
    for trial in range(300):
        n, micro_batch = int(rng.integers(1, 30)), int(rng.integers(1, 9))
        keep = int(rng.integers(1, min(n, 4) + 1))
        targets = {} if trial % 3 else {"target_clip": 0.7, "target_clap": 0.6}
        req = request(trial, n=n, keep=keep, **targets)
        rule = rules[trial % len(rules)]
        clip, clap = rng.random(n).round(2), (1 - rng.random(n) * 0.5).round(2)
        stream, in_flight = PairStream(req, micro_batch), []
        while not stream.finished:
            while stream.can_submit() and len(in_flight) < engine.LOOKAHEAD:
                start, count = stream.submit()
                in_flight.append((start, count, stream.seen()))  # what the driver knew when it asked
            start, count, seen = in_flight.pop(int(rng.integers(len(in_flight))))  # Ray's calls end in any order
            generated = SimpleNamespace(candidates=[SimpleNamespace(seed=req.params.seed + start + j)
                                                    for j in range(count)])
            batch = CandidateBatch(req, start, count, generated=generated)
            batch.scored = score_batch(batch, clip[start:start + count], clap[start:start + count], seen,
                                       lambda c: (b"png%d" % c.seed, b"wav%d" % c.seed), rule)
            stream.add(batch)
        result = stream.result(rule)
        made = len(result.candidates)
        meets = (np.array([req.meets_targets(a, b) for a, b in zip(clip[:made], clap[:made])])
                 if req.adaptive else None)
        expected = rank_with_targets(clip[:made], clap[:made], rule, meets)
        assert result.ok, (trial, result.error)
        assert sorted(c.candidate_index for c in result.kept) == sorted(np.flatnonzero(expected <= keep).tolist())
        assert all(c.image_png == b"png%d" % c.seed for c in result.kept), trial


def test_a_pair_whose_targets_are_not_yet_met_keeps_the_media_a_later_micro_batch_may_promote():
    """Min-max normalisation makes the order of two candidates depend on the others: B ties A after the first
    micro-batch (and loses on candidate order), then beats it once C widens the scores' spans. So a micro-batch
    after which the pair goes on is not ranked as final: B's media is kept for the end."""
    clip, clap = np.array([0.10, 0.30, 0.90]), np.array([0.90, 0.75, 0.0])
    rule = RankingRule("weighted")
    assert list(rank_candidates(clip[:2], clap[:2], rule)) == [1, 2] and list(rank_candidates(clip, clap, rule))[1] == 1
    encoded: list[int] = []
    req = request(9, n=3, keep=1, target_clip=0.99, target_clap=0.99)  # never met: all 3 are made
    stream, _ = stream_in_batches(req, clip, clap, micro_batch=2, rule=rule, encoded=encoded)
    result = stream.result(rule)
    assert result.ok, result.error
    assert [c.candidate_index for c in result.kept] == [1] and result.kept[0].image_png is not None
    assert encoded == [0, 1]  # the last micro-batch, final, encodes nothing: C is not kept
