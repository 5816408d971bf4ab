"""Big manifests: the vectorised validation gives the same answers as the row-by-row reference.

A generated manifest with a sprinkling of every kind of bad value (pws_batch.batch.bench.synthetic_manifest) is
validated both ways and compared request by request and rejection by rejection. Speed is the benchmark's business
(`python -m pws_batch.batch.bench`), never asserted here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

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
