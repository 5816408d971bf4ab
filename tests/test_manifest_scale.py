"""Big manifests: the vectorised validation gives the same answers as the row-by-row reference.

A generated manifest with a sprinkling of every kind of bad value (pws_batch.batch.bench.synthetic_manifest) is
validated both ways and compared request by request and rejection by rejection. Speed is the benchmark's business
(`python -m pws_batch.batch.bench`), never asserted here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pws_batch.batch.bench import same_answers, synthetic_manifest
from pws_batch.batch.config import GenerationDefaults
from pws_batch.batch.manifest import validate_manifest, validate_manifest_by_row
from pws_batch.core.models import SD15_SCHEDULER_CONFIG


def test_large_generated_manifest_same_answers_as_row_by_row():
    df = synthetic_manifest(20_000, seed=3, bad_fraction=0.03)
    fast = validate_manifest(df, scheduler_config=SD15_SCHEDULER_CONFIG)
    assert fast.num_rows == 20_000 and len(fast.rejections) > 500
    # every kind of problem is there
    assert {r.field for r in fast.rejections} >= {"image_prompt", "audio_prompt", "guidance_image", "t_image",
                                                  "steps", "seed", "num_candidates", "keep", "scheduler",
                                                  "target_clip", "pair_id"}
    # the row-by-row reference on a sample: the first 1,500 rows, and 1,500 scattered ones, in their own frames
    rng = np.random.default_rng(0)
    for rows in (np.arange(1500), np.sort(rng.choice(20_000, 1500, replace=False))):
        part = df.iloc[rows].reset_index(drop=True)
        assert same_answers(validate_manifest_by_row(part, scheduler_config=SD15_SCHEDULER_CONFIG),
                            validate_manifest(part, scheduler_config=SD15_SCHEDULER_CONFIG))
    # and on the rejected rows of the whole manifest with their neighbours (duplicate ids need the earlier row)
    first = {r.pair_id: r.row for r in fast.requests}
    assert all(first[r.pair_id] < r.row for r in fast.rejections if r.reason.startswith("duplicate"))


def test_a_scheduler_only_diffusers_computes_is_built_in_a_child_with_the_same_answers():
    """DPMSolverMultistepScheduler's timesteps come from diffusers: the vectorised validation asks a child process
    (schedule.diffusers_in_a_child), the row-by-row reference builds it here; the answers are the same, including
    the rows whose schedule leaves no model active, and the child is gone afterwards."""
    from pws_batch.core import schedule

    df = synthetic_manifest(3_000, seed=5, bad_fraction=0.05, other_scheduler="DPMSolverMultistepScheduler")
    df.loc[:40, ["t_image", "t_audio"]] = 0.5  # a schedule with no active model, on DPM rows among others
    fast = validate_manifest(df, scheduler_config=SD15_SCHEDULER_CONFIG)
    assert schedule._child is None
    dpm = df["scheduler"] == "DPMSolverMultistepScheduler"
    good_dpm = {r.row for r in fast.requests if r.params.scheduler == "DPMSolverMultistepScheduler"}
    assert len(good_dpm) > 500 and any(r.reason.startswith("no model is active") and dpm[r.row]
                                       for r in fast.rejections)
    assert same_answers(validate_manifest_by_row(df, scheduler_config=SD15_SCHEDULER_CONFIG), fast)


def test_when_the_child_cannot_answer_the_timesteps_are_computed_here(monkeypatch):
    from pws_batch.core import schedule

    expected = schedule._through_diffusers("DPMSolverMultistepScheduler", SD15_SCHEDULER_CONFIG, 20, 0.5)
    monkeypatch.setattr(schedule, "_CHILD_CODE", "import sys; sys.exit(3)")  # dies before answering
    with schedule.diffusers_in_a_child():
        assert schedule.schedule_timesteps("DPMSolverMultistepScheduler", SD15_SCHEDULER_CONFIG, 20, 0.5) == expected
        with pytest.raises(ValueError, match="unknown scheduler 'NoSuchScheduler'"):
            schedule.schedule_timesteps("NoSuchScheduler", SD15_SCHEDULER_CONFIG, 20, 1.0)


def test_targets_per_row_with_run_defaults_and_bad_values():
    df = pd.DataFrame({"image_prompt": ["a", "b", "c", "d"], "audio_prompt": ["w", "x", "y", "z"],
                       "target_clip": [0.3, None, "high", float("inf")], "seed": [1, 2, 3, 4]})
    defaults = GenerationDefaults(target_clip=0.1, target_clap=0.2)
    for validate in (validate_manifest, validate_manifest_by_row):
        v = validate(df, defaults, scheduler_config=SD15_SCHEDULER_CONFIG)
        assert [(r.row, r.target_clip, r.target_clap) for r in v.requests] == [(0, 0.3, 0.2), (1, 0.1, 0.2)]
        assert [(r.row, r.field) for r in v.rejections] == [(2, "target_clip"), (3, "target_clip")]
        assert "must be a number" in v.rejections[0].reason and "finite" in v.rejections[1].reason
    plain = validate_manifest(df.iloc[:2], scheduler_config=SD15_SCHEDULER_CONFIG)
    assert [(r.target_clip, r.target_clap, r.adaptive) for r in plain.requests] == [(0.3, None, True),
                                                                                    (None, None, False)]
