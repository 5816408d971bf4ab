"""Scoring and ranking candidates (pws_batch.batch.ranking; docs/algorithm.md, "Ranking the candidates").

The three rules on hand-made scores whose order is derived by hand, then on seeded random scores against
brute-force definitions (reference: top fraction by both first; weighted: weighted sum of min-max normalised
scores; pareto: non-dominated sorting). The CLIP windows (256 x 256, stride 32), and the CLIP / CLAP scorers on the
tiny model set: one finite, deterministic score per input, in range.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pws_batch.batch.ranking import RankingRule, rank_candidates, top_set
from pws_batch.core.scorers import ClapScorer, ClipScorer

RULES = ("reference", "weighted", "pareto")

# Five candidates A..E, hand-made so that the three rules disagree:
#   A = (1.0, 0.7): best CLIP, 3rd CLAP          B = (0.8, 0.8): 2nd by both
#   C = (0.0, 1.0): best CLAP, worst CLIP        D = (0.6, 0.6): dominated by B
#   E = (0.1, 0.1): dominated by everyone but C
# min-max: CLIP spans 0..1 (unchanged), CLAP spans 0.1..1 -> (x - 0.1) / 0.9
# weighted (0.5, 0.5): A .833, B .789, D .578, C .500, E .050  -> A B D C E
# reference, top 40% = 2 of 5: by CLIP {A, B}, by CLAP {C, B}; both: {B} -> B, then A D C E by the weighted sum
# pareto: front 0 {A, B, C}, front 1 {D} (D dominates E), front 2 {E} -> A B C D E
CLIP = [1.0, 0.8, 0.0, 0.6, 0.1]
CLAP = [0.7, 0.8, 1.0, 0.6, 0.1]


def ranks_of(order: str) -> list[int]:
    """'BADCE' -> the rank of A, B, C, D, E."""
    return [order.index(c) + 1 for c in "ABCDE"]


@pytest.mark.parametrize("rule, order", [
    (RankingRule("reference", top_fraction=0.4), "BADCE"),
    (RankingRule("weighted"), "ABDCE"),
    (RankingRule("pareto"), "ABCDE"),
    (RankingRule("weighted", clip_weight=0.0, clap_weight=1.0), "CBADE"),
    (RankingRule("weighted", clip_weight=1.0, clap_weight=0.0), "ABDEC"),
    (RankingRule("reference", top_fraction=1.0), "ABDCE"),  # everyone is in both top sets: the weighted order
])
def test_rules_on_hand_made_scores(rule, order):
    assert rank_candidates(np.array(CLIP), np.array(CLAP), rule).tolist() == ranks_of(order)


def test_reference_is_the_default_rule_with_top_20_percent():
    # 10 candidates, 20% = 2: top CLIP {1, 2}, top CLAP {0, 2}; only 2 is in both
    clip = [0.1, 0.9, 0.8, 0.2, 0.3, 0.4, 0.55, 0.6, 0.7, 0.05]
    clap = [0.9, 0.1, 0.8, 0.2, 0.3, 0.4, 0.55, 0.6, 0.7, 0.05]
    ranks = rank_candidates(clip, clap)
    assert ranks[2] == 1
    assert rank_candidates(clip, clap, RankingRule("reference", 0.2)).tolist() == ranks.tolist()
    # then the rest by the weighted sum (both scores span 0.05..0.9, so the raw sums order them): 8 (1.4), 7 (1.2),
    # 6 (1.1), 0 and 1 (1.0 each, a tie: candidate order), 5 (0.8), 4 (0.6), 3 (0.4), 9 (0.1)
    assert [int(i) for i in np.argsort(ranks)] == [2, 8, 7, 6, 0, 1, 5, 4, 3, 9]


def test_reference_with_nobody_in_both_top_sets_falls_back_to_the_weighted_order():
    clip = [0.2, 0.9, 0.5, 0.3]
    clap = [0.1, 0.8, 0.9, 0.0]  # top 25% = 1: best CLIP is 1, best CLAP is 2, nobody is in both
    assert rank_candidates(clip, clap, RankingRule("reference", top_fraction=0.25)).tolist() == \
        rank_candidates(clip, clap, RankingRule("weighted")).tolist()


def test_top_set_holds_the_top_fraction_and_at_least_one():
    x = np.array([0.2, 0.9, 0.5, 0.7, 0.1, 0.3, 0.8, 0.4, 0.6, 0.0])
    assert np.flatnonzero(top_set(x, 0.2)).tolist() == [1, 6]
    assert np.flatnonzero(top_set(x, 0.3)).tolist() == [1, 3, 6]
    assert np.flatnonzero(top_set(x, 1.0)).tolist() == list(range(10))
    assert np.flatnonzero(top_set(x[:3], 0.1)).tolist() == [1]  # 3 x 10% rounds to 0: still one


# ------------------------------------------------------------------------------------------------ random checks
def minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(x)), float(np.max(x))
    return np.zeros(len(x)) if hi == lo else (x - lo) / (hi - lo)


def brute_weighted_ranks(clip, clap, wc, wa) -> list[int]:
    total = wc * minmax(clip) + wa * minmax(clap)
    order = sorted(range(len(clip)), key=lambda i: (-total[i], i))
    ranks = [0] * len(clip)
    for position, i in enumerate(order):
        ranks[i] = position + 1
    return ranks


def dominates(clip, clap, j, i) -> bool:
    return clip[j] >= clip[i] and clap[j] >= clap[i] and (clip[j] > clip[i] or clap[j] > clap[i])


def random_cases(seed: int, count: int = 30):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n = int(rng.integers(1, 40))
        if rng.random() < 0.3:  # coarse scores: many ties and many dominance relations
            yield rng.integers(0, 4, n).astype(float), rng.integers(0, 4, n).astype(float)
        else:
            yield rng.normal(0.25, 0.05, n), rng.uniform(0, 0.6, n)


def test_weighted_rule_equals_brute_force_weighted_sum_order():
    rng = np.random.default_rng(1)
    for clip, clap in random_cases(2):
        wc, wa = rng.uniform(0, 1, 2) + [0.0, 0.01]
        rule = RankingRule("weighted", clip_weight=float(wc), clap_weight=float(wa))
        assert rank_candidates(clip, clap, rule).tolist() == brute_weighted_ranks(clip, clap, wc, wa)


def test_weighted_rule_ignores_affine_rescaling_of_the_scores():
    rng = np.random.default_rng(3)
    for _ in range(20):
        clip, clap = rng.uniform(-1, 1, 25), rng.uniform(0, 1, 25)
        rule = RankingRule("weighted", clip_weight=0.3, clap_weight=0.7)
        assert rank_candidates(clip, clap, rule).tolist() == \
            rank_candidates(4.0 * clip + 3.0, 0.5 * clap - 2.0, rule).tolist()


def test_reference_rule_puts_the_both_top_set_first_on_random_scores():
    rng = np.random.default_rng(4)
    for _ in range(30):
        n, fraction = 20, float(rng.choice([0.2, 0.3, 0.45]))  # n * fraction is 4, 6 or 9: no rounding ties
        clip, clap = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
        k = int(n * fraction + 1e-9)
        both = set(np.argsort(-clip)[:k]) & set(np.argsort(-clap)[:k])
        ranks = rank_candidates(clip, clap, RankingRule("reference", top_fraction=fraction))
        assert {int(i) for i in np.flatnonzero(ranks <= len(both))} == both
        # inside each group, the weighted sum decides
        total = 0.5 * minmax(clip) + 0.5 * minmax(clap)
        for group in (both, set(range(n)) - both):
            members = sorted(group, key=lambda i: ranks[i])
            assert all(total[a] >= total[b] for a, b in zip(members, members[1:]))


def test_pareto_rule_never_ranks_a_candidate_above_one_that_dominates_it():
    for clip, clap in random_cases(5, count=40):
        n = len(clip)
        ranks = rank_candidates(clip, clap, RankingRule("pareto"))
        for i, j in itertools.permutations(range(n), 2):
            if dominates(clip, clap, j, i):
                assert ranks[j] < ranks[i], (clip.tolist(), clap.tolist(), i, j)
        front0 = {i for i in range(n) if not any(dominates(clip, clap, j, i) for j in range(n))}
        assert front0, "a finite set always has a non-dominated member"
        top = {int(i) for i in np.flatnonzero(ranks <= len(front0))}
        assert top == front0  # ranks 1..k are exactly the non-dominated candidates


@pytest.mark.parametrize("name", RULES)
def test_ranks_are_a_permutation_of_1_to_n(name):
    for clip, clap in random_cases(6):
        ranks = rank_candidates(clip, clap, RankingRule(name))
        assert len(ranks) == len(clip)
        assert np.issubdtype(ranks.dtype, np.integer)
        assert sorted(ranks.tolist()) == list(range(1, len(clip) + 1))


@pytest.mark.parametrize("name", RULES)
def test_constant_scores_keep_candidate_order(name):
    ranks = rank_candidates(np.full(7, 0.3), np.full(7, 0.3), RankingRule(name))
    assert ranks.tolist() == list(range(1, 8))
    assert rank_candidates([0.5], [0.0], RankingRule(name)).tolist() == [1]


@pytest.mark.parametrize("name", RULES)
def test_one_constant_score_ranks_by_the_other(name):
    clap = np.array([0.2, 0.9, 0.5, 0.1])
    ranks = rank_candidates(np.full(4, 0.25), clap, RankingRule(name, top_fraction=0.25))
    assert ranks.tolist() == [3, 1, 2, 4]


# ------------------------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize("kwargs", [
    {"name": "best"}, {"name": "Reference"}, {"top_fraction": 0.0}, {"top_fraction": -0.1},
    {"top_fraction": 1.5}, {"top_fraction": math.nan}, {"clip_weight": -1.0}, {"clap_weight": -0.01},
    {"clip_weight": 0.0, "clap_weight": 0.0},
])
def test_ranking_rule_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        RankingRule(**kwargs)


def test_ranking_rule_error_names_the_rules():
    with pytest.raises(ValueError) as info:
        RankingRule("best")
    assert all(name in str(info.value) for name in RULES)


@pytest.mark.parametrize("kwargs", [{}, {"top_fraction": 1.0}, {"clip_weight": 0.0, "clap_weight": 1.0},
                                    {"name": "pareto"}, {"name": "weighted", "clip_weight": 2.0}])
def test_ranking_rule_accepts_good_settings(kwargs):
    RankingRule(**kwargs)


@pytest.mark.parametrize("kwargs", [{"clip_weight": math.nan}, {"clap_weight": math.inf}])
def test_ranking_rule_rejects_non_finite_weights(kwargs):
    with pytest.raises(ValueError):
        RankingRule("weighted", **kwargs)


# ------------------------------------------------------------------------------------------------ CLIP windows
@pytest.mark.parametrize("width, count", [(1024, 25), (992, 24), (256, 1), (288, 2)])
def test_clip_windows_are_256_wide_with_stride_32(width, count):
    image = np.tile(np.arange(width, dtype=np.int32), (256, 1))  # each pixel holds its column index
    image[:, :] += (np.arange(256, dtype=np.int32) * 10_000)[:, None]  # and its row
    windows = ClipScorer.windows(image)
    assert len(windows) == count
    for i, w in enumerate(windows):
        assert w.shape == (256, 256)
        assert w[0, 0] == 32 * i and w[0, -1] == 32 * i + 255
        assert np.array_equal(w, image[:, 32 * i: 32 * i + 256])
    assert windows[-1][0, -1] == width - 1  # the last window ends at the right edge for these widths


# ------------------------------------------------------------------------------------------------ scorers
SR = 16_000
N_AUDIO = 158_720  # 992 columns x 160 samples: the cropped canvas' sound


def test_to_48k_triples_the_samples_and_caps_at_10_seconds():
    for n in (16_000, N_AUDIO):
        up = ClapScorer.to_48k(np.zeros(n, dtype=np.float32))
        assert len(up) == 3 * n and up.dtype == np.float32
    assert len(ClapScorer.to_48k(np.zeros(163_840))) == 480_000
    assert len(ClapScorer.to_48k(np.zeros(200_000))) == 480_000
    # a 1 kHz tone stays a 1 kHz tone at the new rate
    t = np.arange(N_AUDIO) / SR
    up = ClapScorer.to_48k(0.5 * np.sin(2 * np.pi * 1000 * t))
    spectrum = np.abs(np.fft.rfft(up * np.hanning(len(up))))
    assert abs(np.fft.rfftfreq(len(up), 1 / 48_000)[np.argmax(spectrum)] - 1000) < 1.0


@pytest.fixture(scope="module")
def clip_scorer(tiny_models):
    return ClipScorer(tiny_models + "/clip")


@pytest.fixture(scope="module")
def clap_scorer(tiny_models):
    return ClapScorer(tiny_models + "/clap")


def canvases(count: int, width: int = 1024, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (256, width), dtype=np.uint8) for _ in range(count)]


def test_clip_scores_one_finite_cosine_per_picture(clip_scorer):
    images = canvases(2) + [np.full((256, 992), 128, dtype=np.uint8)]
    scores = clip_scorer(images, "a sea landscape with ships, grayscale")
    assert scores.shape == (3,) and scores.dtype == np.float64
    assert np.all(np.isfinite(scores)) and np.all(np.abs(scores) <= 1.0 + 1e-6)


def test_clip_score_is_deterministic_and_the_mean_over_windows(clip_scorer):
    (image,) = canvases(1, width=320, seed=1)  # 3 windows
    text = "police cars"
    twice = clip_scorer([image, image], text)
    assert twice[0] == pytest.approx(twice[1], abs=1e-6)
    assert clip_scorer([image], text)[0] == pytest.approx(twice[0], abs=1e-6)
    per_window = clip_scorer(ClipScorer.windows(image), text)
    assert len(per_window) == 3
    assert twice[0] == pytest.approx(float(per_window.mean()), abs=1e-5)


def noise_and_tone(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    return [(0.1 * rng.standard_normal(n)).astype(np.float32),
            (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)]


def test_clap_scores_one_finite_non_negative_score_per_sound(clap_scorer):
    sounds = noise_and_tone(N_AUDIO, seed=0)
    scores = clap_scorer(sounds + [sounds[0]], "birds singing softly")
    assert scores.shape == (3,)
    assert np.all(np.isfinite(scores)) and np.all(scores >= 0.0) and np.all(scores <= 1.0 + 1e-6)
    assert scores[2] == pytest.approx(scores[0], abs=1e-6)  # the same sound twice: the same score


@pytest.mark.parametrize("n", [N_AUDIO, 163_840])
def test_clap_score_has_no_random_crop(clap_scorer, n):
    # 163840 samples is 10.24 s: longer than CLAP's 10 s window, so only the cap in to_48k keeps the
    # feature extractor's random truncation (which draws from numpy's global RNG) from running
    sounds = noise_and_tone(n, seed=1)
    np.random.seed(0)
    first = clap_scorer(sounds, "a dog barking")
    np.random.seed(12345)
    second = clap_scorer(sounds, "a dog barking")
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-6)


def test_clap_input_is_peak_normalised_at_48k_as_the_reference_scores_it(clap_scorer):
    """The reference evaluator resamples to 48 kHz and peak-normalises to 1 (librosa.util.normalize): a sound's
    loudness does not change its CLAP score."""
    from scipy.signal import resample_poly

    quiet, tone = noise_and_tone(N_AUDIO, seed=2)
    up = ClapScorer.to_48k(quiet)
    assert np.abs(up).max() == pytest.approx(1.0, abs=1e-6)
    expected = resample_poly(quiet.astype(np.float64), 3, 1)
    np.testing.assert_allclose(up, expected / np.abs(expected).max(), atol=1e-6)
    np.testing.assert_allclose(ClapScorer.to_48k(0.01 * quiet), up, atol=1e-6)
    scores = clap_scorer([quiet, 20 * quiet, tone, 0.05 * tone], "rain on a roof")
    assert scores[0] == pytest.approx(scores[1], abs=1e-5) and scores[2] == pytest.approx(scores[3], abs=1e-5)
    assert not np.any(ClapScorer.to_48k(np.zeros(100)))  # silence stays silent


def test_a_prompt_longer_than_each_text_window_is_scored_on_its_start(clip_scorer, clap_scorer):
    """CLIP takes 77 tokens, CLAP (RoBERTa, 514 positions) 512: longer texts are truncated, never fail."""
    from pws_batch.core.scorers import text_window

    assert text_window(clip_scorer.model.config.text_config, clip_scorer.processor.tokenizer) == 77
    assert text_window(clap_scorer.model.config.text_config, clap_scorer.processor.tokenizer) == 512
    long = "a dog barks at the mailman while rain falls on the tin roof " * 12  # ~720 byte tokens
    assert len(clap_scorer.processor.tokenizer(long).input_ids) > 600
    start = long[:400]  # already more than 77 tokens for CLIP
    clip_long, clip_start = clip_scorer(canvases(1), long), clip_scorer(canvases(1), start)
    assert np.isfinite(clip_long).all() and clip_long[0] == pytest.approx(clip_start[0], abs=1e-6)
    clap_long = clap_scorer(noise_and_tone(N_AUDIO, seed=3), long)
    assert clap_long.shape == (2,) and np.isfinite(clap_long).all()
    cut = clap_scorer.processor.tokenizer.decode(clap_scorer.processor.tokenizer(long).input_ids[1:511])
    np.testing.assert_allclose(clap_long, clap_scorer(noise_and_tone(N_AUDIO, seed=3), cut), atol=1e-5)
