"""Manifest reading and validation (pws_batch.batch.manifest).

Good rows become PairRequests with the run's defaults filled in and the row's own values winning; every kind of
bad row becomes a Rejection (row, field, reason, fix) while the other rows still validate; a manifest that cannot
be used as a whole raises ManifestError; pass-through columns are carried untouched (renamed when they clash with
an output column); ids are stable; Parquet / CSV / JSON Lines read the same.
"""

from __future__ import annotations

import json
import pickle
import math
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pws_batch.batch.config import GenerationDefaults
from pws_batch.batch.manifest import (ManifestError, PairRequest, Rejection, default_pair_id, read_manifest,
                                rejections_table, validate_manifest)
from pws_batch.core.models import SD15_SCHEDULER_CONFIG
from pws_batch.core.params import MAX_PROMPT_CHARS, GenerationParams

DEFAULTS = GenerationDefaults(num_candidates=4, keep=2, steps=10, seed=7, crop_columns=16, grayscale_suffix=False)


def validate(df, defaults: GenerationDefaults = DEFAULTS, **kw):
    return validate_manifest(df, defaults, scheduler_config=SD15_SCHEDULER_CONFIG, **kw)


def row(**kw) -> dict:
    return {"image_prompt": "a sea landscape with ships", "audio_prompt": "birds singing softly", **kw}


def rejection_at(validated, index: int) -> Rejection:
    found = [r for r in validated.rejections if r.row == index]
    assert len(found) == 1, f"expected one rejection for row {index}, got {validated.rejections}"
    return found[0]


def write_wav(path, seconds: float = 0.5, rate: int = 16_000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)


# ------------------------------------------------------------------------------------------------ good rows
def test_defaults_fill_missing_values_and_row_values_win():
    df = pd.DataFrame([
        row(),
        row(image_prompt="police cars", audio_prompt="police siren", num_candidates=6, keep=3, steps=20, seed=11,
            guidance_image=9.5, guidance_audio=7.0, t_image=0.8, t_audio=1.0, strength=0.8,
            negative_image_prompt="blurry", scheduler="DDIMScheduler"),
    ])
    v = validate(df)
    assert v.rejections == [] and v.num_rows == 2
    first, second = v.requests
    assert (first.row, second.row) == (0, 1)

    # row 0 left everything out: the run's defaults, then GenerationParams' own defaults
    p = first.params
    assert (p.num_candidates, p.steps, p.seed, p.crop_columns, p.grayscale_suffix) == (4, 10, 7, 16, False)
    assert first.keep == 2
    plain = GenerationParams("x", "y")
    for name in ("guidance_image", "guidance_audio", "t_image", "t_audio", "weight_image", "weight_audio",
                 "strength", "negative_image_prompt", "negative_audio_prompt", "scheduler", "guide_audio"):
        assert getattr(p, name) == getattr(plain, name), name
    assert (p.image_prompt, p.audio_prompt) == ("a sea landscape with ships", "birds singing softly")

    # row 1's own values win over the defaults (and the integer columns come back as int, not float)
    q = second.params
    assert (q.num_candidates, q.steps, q.seed) == (6, 20, 11)
    assert all(type(getattr(q, n)) is int for n in ("num_candidates", "steps", "seed"))
    assert second.keep == 3 and type(second.keep) is int
    assert (q.guidance_image, q.guidance_audio, q.t_image, q.t_audio, q.strength) == (9.5, 7.0, 0.8, 1.0, 0.8)
    assert q.negative_image_prompt == "blurry" and q.negative_audio_prompt == ""
    # run-level settings that are not manifest columns still come from the defaults
    assert (q.crop_columns, q.grayscale_suffix) == (16, False)


def test_nan_in_an_optional_numeric_column_means_the_default():
    df = pd.DataFrame([row(guidance_image=7.5, num_candidates=6, seed=3),
                       row(guidance_image=np.nan, num_candidates=np.nan, seed=np.nan)])
    assert df["num_candidates"].dtype == np.float64  # the NaN forced the column to float
    v = validate(df)
    assert v.rejections == []
    a, b = v.requests
    assert (a.params.guidance_image, a.params.num_candidates, a.params.seed) == (7.5, 6, 3)
    assert b.params.guidance_image == GenerationParams("x", "y").guidance_image
    assert b.params.num_candidates == DEFAULTS.num_candidates and b.params.seed == DEFAULTS.seed
    assert type(a.params.num_candidates) is int


def test_numbers_written_as_text_are_read_as_numbers():
    v = validate(pd.DataFrame([row(guidance_image=" 7.5 ", steps="20")]))
    assert v.rejections == []
    assert v.requests[0].params.guidance_image == 7.5 and v.requests[0].params.steps == 20


def test_pass_through_columns_are_carried_untouched():
    df = pd.DataFrame([
        row(notes="first", score=5, weight=0.25, flag=True, maybe=1.5),
        row(seed=1, notes="second", score=-2, weight=1.0, flag=False, maybe=np.nan),
    ])
    v = validate(df)
    assert v.rejections == []
    a, b = v.requests
    assert a.extra == {"notes": "first", "score": 5, "weight": 0.25, "flag": True, "maybe": 1.5}
    assert b.extra == {"notes": "second", "score": -2, "weight": 1.0, "flag": False, "maybe": None}
    # types: plain Python, as the manifest held them (ints stay ints, bools stay bools)
    assert [type(a.extra[k]) for k in ("notes", "score", "weight", "flag", "maybe")] == [str, int, float, bool, float]
    # known columns never land in extra, and pass-through columns never change the parameters
    assert set(a.extra) == {"notes", "score", "weight", "flag", "maybe"}
    json.dumps(a.extra)  # JSON-ready (run.json, Ray payloads)


def test_a_prompt_of_exactly_the_maximum_length_is_accepted():
    v = validate(pd.DataFrame([row(image_prompt="x" * MAX_PROMPT_CHARS)]))
    assert v.rejections == [] and len(v.requests) == 1


def test_pair_request_round_trips_as_ray_and_prefect_carry_it():
    """Requests travel to the actors as they are (pickled), never as hand-made dicts."""
    v = validate(pd.DataFrame([row(pair_id="p1", notes="n", keep=1)]))
    req = v.requests[0]
    again = pickle.loads(pickle.dumps(req))
    assert again == req and isinstance(again, PairRequest)


# ------------------------------------------------------------------------------------------------ bad rows
BAD_ROWS = [
    # overrides for the middle row, the field named, a piece of the reason
    ({"image_prompt": ""}, "image_prompt", "empty"),
    ({"image_prompt": "   \t "}, "image_prompt", "empty"),
    ({"audio_prompt": None}, "audio_prompt", "missing"),
    ({"audio_prompt": np.nan}, "audio_prompt", "missing"),
    ({"image_prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "image_prompt", str(MAX_PROMPT_CHARS + 1)),
    ({"audio_prompt": "y" * (MAX_PROMPT_CHARS + 5)}, "audio_prompt", str(MAX_PROMPT_CHARS + 5)),
    ({"negative_image_prompt": "z" * (MAX_PROMPT_CHARS + 1)}, "negative_image_prompt", str(MAX_PROMPT_CHARS + 1)),
    ({"guidance_image": "high"}, "guidance_image", "'high'"),
    ({"guidance_audio": True}, "guidance_audio", "boolean"),
    ({"num_candidates": 2.5}, "num_candidates", "whole number"),
    ({"seed": 1.5}, "seed", "whole number"),
    ({"guidance_image": math.inf}, "guidance_image", "finite"),
    ({"strength": -math.inf}, "strength", "finite"),
    ({"guidance_image": -1.0}, "guidance_image", ">= 0"),
    ({"guidance_audio": -0.5}, "guidance_audio", ">= 0"),
    ({"weight_audio": -0.1}, "weight_audio", ">= 0"),
    ({"t_image": 1.5}, "t_image", "[0, 1]"),
    ({"t_image": -0.1}, "t_image", "[0, 1]"),
    ({"t_audio": 1.01}, "t_audio", "[0, 1]"),
    ({"strength": 0.0}, "strength", "(0, 1]"),
    ({"strength": 1.5}, "strength", "(0, 1]"),
    ({"steps": 0}, "steps", "0"),
    ({"steps": 1001}, "steps", "1001"),
    ({"num_candidates": 0}, "num_candidates", "0"),
    ({"seed": -1}, "seed", "-1"),
    ({"keep": 5, "num_candidates": 4}, "keep", "4"),
    ({"keep": 0}, "keep", "0"),
    ({"scheduler": "ddim"}, "scheduler", "'ddim'"),
    ({"scheduler": "NoSuchScheduler"}, "scheduler", "NoSuchScheduler"),
    ({"guide_audio": "/no/such/dir/guide.wav"}, "guide_audio", "/no/such/dir/guide.wav"),
    ({"guide_image": "/no/such/dir/guide.png"}, "guide_image", "/no/such/dir/guide.png"),
    ({"negative_audio_prompt": 3}, "negative_audio_prompt", "text"),
    ({"pair_id": "p" * 201}, "pair_id", "200"),
    ({"pair_id": "   "}, "pair_id", "non-empty"),
    ({"weight_image": 0.0, "weight_audio": 0.0}, "weight_image", "both base weights are 0"),
]


def validate_with_bad_middle_row(bad: dict):
    df = pd.DataFrame([row(seed=1, pair_id="good-0"), row(**{"seed": 2, "pair_id": "bad-1", **bad}),
                       row(seed=3, pair_id="good-2")])
    return validate(df)


BAD_IDS = [f"{f}-{i}" for i, (_, f, _) in enumerate(BAD_ROWS)]


@pytest.mark.parametrize("bad, field, reason_part", BAD_ROWS, ids=BAD_IDS)
def test_a_bad_row_is_rejected_and_the_others_still_validate(bad, field, reason_part):
    v = validate_with_bad_middle_row(bad)
    assert [r.row for r in v.requests] == [0, 2]
    assert [r.pair_id for r in v.requests] == ["good-0", "good-2"]
    r = rejection_at(v, 1)
    assert r.field == field
    assert reason_part in r.reason, r.reason
    pair_id = bad.get("pair_id", "bad-1")
    assert r.pair_id == pair_id
    assert str(r).startswith(f"row 1 (pair_id {pair_id!r}): {field}: ")
    assert len(v.rejections) == 1 and v.num_rows == 3
    # the rejection carries the row's values, NaN shown as None, and they are JSON-ready
    assert r.values["pair_id"] == pair_id and r.values["seed"] == bad.get("seed", 2)
    json.loads(json.dumps(r.values, default=str))
    assert not any(isinstance(x, float) and math.isnan(x) for x in r.values.values())


@pytest.mark.parametrize("bad, field", [
    pytest.param(bad, field, id=i) for i, (bad, field, _) in zip(BAD_IDS, BAD_ROWS)])
def test_every_rejection_says_how_to_fix_it(bad, field):
    r = rejection_at(validate_with_bad_middle_row(bad), 1)
    assert r.reason.strip() and r.fix.strip(), f"{r}: a rejection must say what is wrong and how to fix it"
    assert "; fix: " in str(r)


def test_rejection_names_the_explicit_pair_id_of_the_row():
    v = validate(pd.DataFrame([row(pair_id="mine", steps=0)]))
    assert v.rejections[0].pair_id == "mine" and "'mine'" in str(v.rejections[0])


def test_several_problems_in_one_row_are_all_named():
    v = validate(pd.DataFrame([row(guidance_image="high", steps=2.5, seed=True)]))
    (r,) = v.rejections
    assert r.field in {"guidance_image", "steps", "seed"}
    others = {"guidance_image", "steps", "seed"} - {r.field}
    assert all(f"; and {f}: " in r.reason for f in others), r.reason


def test_duplicate_explicit_pair_id_rejects_the_second_and_names_the_first_row():
    df = pd.DataFrame([row(pair_id="a", seed=1), row(pair_id="dup", seed=2), row(pair_id="b", seed=3),
                       row(pair_id="dup", seed=4)])
    v = validate(df)
    assert [r.pair_id for r in v.requests] == ["a", "dup", "b"]
    r = rejection_at(v, 3)
    assert r.field == "pair_id" and r.pair_id == "dup"
    assert "row 1" in r.reason and "'dup'" in r.reason
    assert "pair_id" in r.fix


def test_two_identical_rows_without_pair_id_get_the_same_default_id_and_the_second_is_rejected():
    df = pd.DataFrame([row(), row(image_prompt="other"), row()])
    v = validate(df)
    assert [r.row for r in v.requests] == [0, 1]
    first = v.requests[0]
    assert first.pair_id == default_pair_id(first.params)
    r = rejection_at(v, 2)
    assert r.field == "pair_id" and r.pair_id == first.pair_id
    assert "row 0" in r.reason
    assert "seed" in r.fix  # the fix for a repeated row: drop it or change its seed


def test_integer_pair_ids_are_accepted_as_text():
    df = pd.DataFrame([row(pair_id=1, seed=1), row(pair_id=2, seed=2)])
    assert df["pair_id"].dtype.kind == "i"
    v = validate(df)
    assert v.rejections == []
    assert [r.pair_id for r in v.requests] == ["1", "2"]


def test_integer_and_text_pair_ids_collide_when_equal_as_text():
    df = pd.DataFrame([row(pair_id=7, seed=1), row(pair_id="7", seed=2)], dtype=object)
    v = validate(df)
    assert [r.pair_id for r in v.requests] == ["7"]
    assert rejection_at(v, 1).field == "pair_id"


def test_relative_guide_path_is_resolved_against_base(tmp_path):
    write_wav(tmp_path / "guide.wav")
    df = pd.DataFrame([row(guide_audio="guide.wav", strength=0.8)])
    v = validate(df, base=str(tmp_path))
    assert v.rejections == []
    assert v.requests[0].params.guide_audio == str(tmp_path) + "/guide.wav"
    # the same relative path against another folder: not there, rejected on guide_audio
    (tmp_path / "elsewhere").mkdir()
    v = validate(df, base=str(tmp_path / "elsewhere"))
    assert v.requests == [] and v.rejections[0].field == "guide_audio"
    assert "elsewhere" in v.rejections[0].reason


def test_absolute_guide_paths_and_uris_are_not_rebased(tmp_path):
    import fsspec

    write_wav(tmp_path / "g.wav")
    uri = f"memory://guides-test/{uuid.uuid4().hex}/g.wav"
    with open(tmp_path / "g.wav", "rb") as src, fsspec.open(uri, "wb") as dst:
        dst.write(src.read())
    df = pd.DataFrame([row(guide_audio=str(tmp_path / "g.wav"), seed=1), row(guide_audio=uri, seed=2)])
    v = validate(df, base="/somewhere/else")
    assert v.rejections == []
    assert [r.params.guide_audio for r in v.requests] == [str(tmp_path / "g.wav"), uri]


def test_unreadable_guide_is_rejected_and_check_files_false_skips_opening(tmp_path):
    (tmp_path / "broken.wav").write_bytes(b"this is not audio")
    df = pd.DataFrame([row(guide_audio=str(tmp_path / "broken.wav"))])
    r = validate(df).rejections[0]
    assert r.field == "guide_audio" and "broken.wav" in r.reason
    assert len(validate(df, check_files=False).requests) == 1


def test_both_guides_set_is_rejected(tmp_path):
    write_wav(tmp_path / "g.wav")
    v = validate(pd.DataFrame([row(guide_audio="g.wav", guide_image="g.png")]), base=str(tmp_path))
    assert v.rejections[0].field == "guide_audio" and "both" in v.rejections[0].reason


def test_a_schedule_with_no_active_model_is_rejected_naming_the_timestep():
    # DDIM with SD 1.5's config (1000 train steps, steps_offset 1, "leading" spacing) at 10 steps runs
    # 901, 801, ..., 1. t_image = t_audio = 0.5 switches both models off until t <= 500: 901 is the first off.
    df = pd.DataFrame([row(t_image=0.5, t_audio=0.5, seed=1), row(t_image=0.95, t_audio=0.0, seed=2),
                       row(t_image=0.9, t_audio=0.0, seed=3)])
    v = validate(df)
    assert [r.row for r in v.requests] == [1]  # 0.95 * 1000 = 950 >= 901: the image model is on from the start
    r0 = rejection_at(v, 0)
    assert r0.field == "t_image"
    assert "timestep 901" in r0.reason
    assert "t_image" in r0.fix or "t_audio" in r0.fix
    assert "timestep 901" in rejection_at(v, 2).reason  # 900 < 901: still off at the first step


def test_without_a_scheduler_config_the_schedule_is_not_checked():
    v = validate_manifest(pd.DataFrame([row(t_image=0.5, t_audio=0.5)]), DEFAULTS)
    assert len(v.requests) == 1


# ------------------------------------------------------------------------------------------------ whole manifest
def test_missing_required_column_raises_with_a_typo_hint():
    df = pd.DataFrame({"image_promt": ["a"], "audio_prompt": ["b"]})
    with pytest.raises(ManifestError) as info:
        validate(df)
    message = str(info.value)
    assert "'image_prompt'" in message and "image_promt" in message and "typo" in message


def test_missing_both_required_columns_names_both():
    with pytest.raises(ManifestError) as info:
        validate(pd.DataFrame({"prompt": ["a"]}))
    assert "image_prompt" in str(info.value) and "audio_prompt" in str(info.value)


def test_duplicate_column_names_raise():
    df = pd.DataFrame([["a", "b", "c"]], columns=["image_prompt", "audio_prompt", "audio_prompt"])
    with pytest.raises(ManifestError, match="audio_prompt"):
        validate(df)


def test_pass_through_column_named_like_an_output_column_is_renamed_with_a_warning():
    df = pd.DataFrame([row(image="my picture", rank=3, notes="n")])
    v = validate(df)
    (req,) = v.requests
    assert req.extra == {"manifest_image": "my picture", "manifest_rank": 3, "notes": "n"}
    assert any("'image'" in w and "'manifest_image'" in w for w in v.warnings)
    assert any("'rank'" in w and "'manifest_rank'" in w for w in v.warnings)
    assert not any("'notes'" in w for w in v.warnings)


def test_near_miss_column_name_warns_did_you_mean_and_is_not_used():
    df = pd.DataFrame([row(guidance_imag=3.0)])
    v = validate(df)
    assert any("'guidance_imag'" in w and "did you mean 'guidance_image'" in w for w in v.warnings)
    (req,) = v.requests
    assert req.extra == {"guidance_imag": 3.0}
    assert req.params.guidance_image == GenerationParams("x", "y").guidance_image


@pytest.mark.parametrize("column", ["base_seed", "unet_evals"])
def test_pass_through_column_named_like_a_kept_row_column_is_renamed(column):
    from pws_batch.batch.pair import PairResult, ScoredCandidate
    from pws_batch.batch.run import kept_rows

    v = validate(pd.DataFrame([row(seed=5, **{column: -123})]))
    (req,) = v.requests
    result = PairResult(req, [ScoredCandidate(0, 5, 0.1, 0.2, 1, True, b"", b"")], generate_s=1.0, rank_s=0.1,
                        unet_evals=40)
    (out,) = kept_rows(result, "00000", {})
    assert out["base_seed"] == 5 and out["unet_evals"] == 40
    assert out[f"manifest_{column}"] == -123


# ------------------------------------------------------------------------------------------------ ids
def test_default_pair_id_is_stable_and_depends_on_the_parameters():
    a = GenerationParams("a dog", "a bark", seed=1)
    assert default_pair_id(a) == default_pair_id(GenerationParams("a dog", "a bark", seed=1))
    assert default_pair_id(a).startswith("pair-")
    others = [GenerationParams("a dog", "a bark", seed=2), GenerationParams("a cat", "a bark", seed=1),
              GenerationParams("a dog", "a bark", seed=1, guidance_image=7.0)]
    ids = {default_pair_id(a), *map(default_pair_id, others)}
    assert len(ids) == 4


# ------------------------------------------------------------------------------------------------ reading files
FRAME = pd.DataFrame({
    "image_prompt": ["sea landscape with ships", "police cars"],
    "audio_prompt": ["birds singing", "police siren"],
    "guidance_image": [8.0, 9.5],
    "num_candidates": [3, 5],
    "pair_id": ["ships", "police"],
    "notes": ["one", "two"],
})


@pytest.mark.parametrize("suffix", ["parquet", "csv", "jsonl", "csv.gz"])
def test_read_manifest_formats_give_the_same_requests(tmp_path, suffix):
    path = tmp_path / f"pairs.{suffix}"
    if suffix == "parquet":
        FRAME.to_parquet(path)
    elif suffix.startswith("csv"):
        FRAME.to_csv(path, index=False)
    else:
        FRAME.to_json(path, orient="records", lines=True)
    df = read_manifest(str(path))
    v = validate(df)
    assert v.rejections == []
    assert [r.pair_id for r in v.requests] == ["ships", "police"]
    assert [r.params.guidance_image for r in v.requests] == [8.0, 9.5]
    assert [r.params.num_candidates for r in v.requests] == [3, 5]
    assert [r.extra for r in v.requests] == [{"notes": "one"}, {"notes": "two"}]


def test_csv_blank_cells_are_missing_but_na_text_is_text(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("image_prompt,audio_prompt,guidance_image,negative_image_prompt,seed\n"
                    "NA,None,,,1\n"
                    "a dog,,7.0,blurry,2\n")
    df = read_manifest(str(path))
    v = validate(df)
    assert [r.row for r in v.requests] == [0]
    p = v.requests[0].params
    assert (p.image_prompt, p.audio_prompt) == ("NA", "None")  # only blank cells are missing
    assert p.guidance_image == GenerationParams("x", "y").guidance_image and p.negative_image_prompt == ""
    r = rejection_at(v, 1)
    assert r.field == "audio_prompt" and "missing" in r.reason


def test_read_manifest_of_a_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.parquet")
    with pytest.raises(ManifestError, match="nope.parquet"):
        read_manifest(path)


@pytest.mark.parametrize("name, content, fmt", [
    ("bad.parquet", b"this is not parquet at all", "Parquet"),
    ("bad.csv", b"", "empty"),
])
def test_read_manifest_of_garbage_names_the_path_and_format(tmp_path, name, content, fmt):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ManifestError) as info:
        read_manifest(str(path))
    assert str(path) in str(info.value) and fmt in str(info.value)


def test_jsonl_text_pair_ids_stay_text(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image_prompt": "a", "audio_prompt": "b", "pair_id": "001"}\n'
                    '{"image_prompt": "c", "audio_prompt": "d", "pair_id": "1"}\n')
    v = validate(read_manifest(str(path)))
    assert [r.pair_id for r in v.requests] == ["001", "1"]


def test_csv_integer_pair_ids_with_a_blank_cell(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("image_prompt,audio_prompt,pair_id\na,b,1\nc,d,\n")
    v = validate(read_manifest(str(path)))
    assert v.rejections == []
    assert v.requests[0].pair_id == "1"


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_big_whole_numbers_beside_an_empty_cell_are_kept_exactly(tmp_path, fmt):
    """pandas reads a column of whole numbers with an empty cell as float64, and 2**62 + 1 as a float is 2**62: a
    seed the user chose must be the seed the run uses (and records), whatever the format; pair ids likewise."""
    big, rows = 2**62 + 1, [{"image_prompt": "a", "audio_prompt": "b", "seed": 2**62 + 1, "pair_id": 2**60 + 3,
                              "steps": 12},
                             {"image_prompt": "c", "audio_prompt": "d", "seed": None, "pair_id": None, "steps": None}]
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
            ("image_prompt", pa.string()), ("audio_prompt", pa.string()), ("seed", pa.int64()),
            ("pair_id", pa.int64()), ("steps", pa.int64())])), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    else:
        path.write_text("image_prompt,audio_prompt,seed,pair_id,steps\n"
                        + "".join(",".join("" if v is None else str(v) for v in r.values()) + "\n" for r in rows))
    v = validate(read_manifest(str(path)))
    assert v.rejections == []
    assert v.requests[0].params.seed == big and v.requests[0].pair_id == str(2**60 + 3)
    assert v.requests[0].params.steps == 12  # an empty cell takes the default
    assert (v.requests[1].params.seed, v.requests[1].params.steps) == (DEFAULTS.seed, DEFAULTS.steps)


def test_a_parquet_manifest_pandas_wrote_with_its_index_reads_as_the_user_sees_it(tmp_path):
    """pandas stores a DataFrame's index in the file: the labels a row filter leaves (once an IndexError: the
    index column shifted every column after it) are dropped; a named index is the column it was."""
    df = pd.DataFrame([row(pair_id=f"p{i}", seed=i, note=f"n{i}") for i in range(5)])
    df.iloc[[0, 2, 3]].to_parquet(tmp_path / "filtered.parquet")
    df.iloc[1:3].to_parquet(tmp_path / "sliced.parquet")
    df.set_index("pair_id").to_parquet(tmp_path / "indexed.parquet")
    cases = {"filtered": ["p0", "p2", "p3"], "sliced": ["p1", "p2"], "indexed": [f"p{i}" for i in range(5)]}
    for name, ids in cases.items():
        frame = read_manifest(str(tmp_path / f"{name}.parquet"))
        v = validate(frame)
        assert v.rejections == [] and v.warnings == [], name
        assert [(r.row, r.pair_id, r.params.seed) for r in v.requests] == [(i, p, int(p[1:])) for i, p in enumerate(ids)]
        assert [r.extra for r in v.requests] == [{"note": f"n{p[1:]}"} for p in ids], name  # no index column carried


def test_parquet_list_pass_through_column_keeps_its_lists(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"image_prompt": ["a", "c"], "audio_prompt": ["b", "d"], "tags": [["x"], ["y", "z"]]}),
                   path)
    v = validate(read_manifest(str(path)))
    assert not isinstance(v.requests[0].extra["tags"], str)
    assert [list(r.extra["tags"]) for r in v.requests] == [["x"], ["y", "z"]]


# ------------------------------------------------------------------------------------------------ rejected.parquet
def test_rejections_table_has_one_row_per_rejection():
    df = pd.DataFrame([row(steps=0, pair_id="zero-steps"), row(), row(image_prompt="", notes=np.nan)])
    v = validate(df)
    table = rejections_table(v.rejections)
    assert isinstance(table, pa.Table)
    assert table.column_names == ["row", "pair_id", "field", "reason", "fix", "row_json"]
    assert table.num_rows == len(v.rejections) == 2
    assert table.schema.field("row").type == pa.int64()
    assert all(table.schema.field(c).type == pa.string() for c in table.column_names[1:])
    assert table["row"].to_pylist() == [0, 2]
    assert table["pair_id"].to_pylist() == ["zero-steps", None]
    assert table["field"].to_pylist() == ["steps", "image_prompt"]
    assert table["reason"].to_pylist() == [r.reason for r in v.rejections]
    assert table["fix"].to_pylist() == [r.fix for r in v.rejections]
    values = [json.loads(s) for s in table["row_json"].to_pylist()]
    assert values[0]["steps"] == 0 and values[0]["pair_id"] == "zero-steps"
    assert values[1]["image_prompt"] == "" and values[1]["notes"] is None


def test_rejections_table_of_nothing_is_empty_but_typed():
    table = rejections_table([])
    assert table.num_rows == 0
    assert table.column_names == ["row", "pair_id", "field", "reason", "fix", "row_json"]
    assert table.schema.field("row").type == pa.int64()


# ------------------------------------------------------------------------------------------------ every row answered
def test_csv_rows_with_too_many_or_too_few_fields_are_rejected_by_row_and_the_rest_read_right(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("pair_id,image_prompt,audio_prompt\n"
                    "meow,cats,meow,extra,more\n"      # row 0: too many fields (pandas would shift every column)
                    "bark,dogs,barking\n"             # row 1: good
                    "short,only two\n"                 # row 2: too few
                    '"q,1","a, quoted picture","rain"\n')  # row 3: good, with quoted commas
    v = validate(read_manifest(str(path)))
    assert [(r.row, r.pair_id) for r in v.requests] == [(1, "bark"), (3, "q,1")]
    bark = v.requests[0].params
    assert (bark.image_prompt, bark.audio_prompt) == ("dogs", "barking")
    assert v.requests[1].params.image_prompt == "a, quoted picture"
    too_many, too_few = rejection_at(v, 0), rejection_at(v, 2)
    assert too_many.field == "row" and "5 fields but the header has 3" in too_many.reason and "line 2" in too_many.reason
    assert too_few.field == "row" and "2 fields" in too_few.reason and "line 4" in too_few.reason
    assert too_many.fix and v.num_rows == 4


def test_a_broken_json_line_is_rejected_with_its_line_number_and_the_good_lines_go_on(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"pair_id": "a", "image_prompt": "cats", "audio_prompt": "meow"}\n'
                    '\n'
                    '{"pair_id": "b", "image_prompt": "dogs", "audio_prompt": \n'
                    '[1, 2]\n'
                    '{"pair_id": "c", "image_prompt": "frogs", "audio_prompt": "croak"}\n')
    v = validate(read_manifest(str(path)))
    assert [(r.row, r.pair_id) for r in v.requests] == [(0, "a"), (3, "c")]
    broken, not_object = rejection_at(v, 1), rejection_at(v, 2)
    assert broken.field == "row" and "line 3" in broken.reason and "position" not in broken.reason
    assert "line 4" in not_object.reason and "not an object" in not_object.reason
    assert v.num_rows == 4


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", ""), ("header.csv", "image_prompt,audio_prompt\n"), ("broken.jsonl", "{not json\n"),
])
def test_an_empty_manifest_or_one_with_no_good_row_validates_to_no_request(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    v = validate(read_manifest(str(path)))
    assert v.requests == []
    if name == "broken.jsonl":
        assert len(v.rejections) == 1 and "line 1" in v.rejections[0].reason


@pytest.mark.parametrize("bad, field, reason_part", [
    ({"guidance_image": 1e308}, "guidance_image", "at most 100"),
    ({"guidance_audio": 101}, "guidance_audio", "at most 100"),
    ({"weight_audio": 1e308}, "weight_audio", "ratio"),
    ({"weight_image": 1e-300}, "weight_image", "ratio"),
    ({"num_candidates": 10000}, "num_candidates", "one pair runs on one GPU"),
])
def test_absurd_numbers_are_rejected_by_row_with_the_reason(bad, field, reason_part):
    v = validate(pd.DataFrame([row(pair_id="ok"), row(pair_id="bad", **bad)]))
    assert [r.pair_id for r in v.requests] == ["ok"]
    r = rejection_at(v, 1)
    assert r.field == field and reason_part in r.reason and r.fix, r


def test_guides_come_only_from_the_manifest_storage_and_allowed_places(tmp_path):
    from pws_batch.batch.manifest import guide_allowed

    here, elsewhere = tmp_path / "m", tmp_path / "other"
    here.mkdir(), elsewhere.mkdir()
    write_wav(here / "g.wav")
    write_wav(elsewhere / "g.wav")
    manifest = str(here / "pairs.parquet")
    df = pd.DataFrame([row(pair_id="near", guide_audio="g.wav"),
                       row(pair_id="far", guide_audio=str(elsewhere / "g.wav")),
                       row(pair_id="escape", guide_audio="../other/g.wav"),
                       row(pair_id="web", guide_audio="http://127.0.0.1:9/g.wav")])
    v = validate(df, base=str(here), manifest=manifest, allow_guides=[])
    assert [r.pair_id for r in v.requests] == ["near"]
    for i in (1, 2, 3):
        r = rejection_at(v, i)
        assert r.field == "guide_audio" and "outside the places" in r.reason and "--allow-guides" in r.fix
    v = validate(df, base=str(here), manifest=manifest, allow_guides=["local"])
    assert [r.pair_id for r in v.requests] == ["near", "far", "escape"]
    assert "outside the places" in rejection_at(v, 3).reason  # the URL is never opened
    v = validate(df, base=str(here), manifest=manifest, allow_guides=[str(elsewhere)])
    assert [r.pair_id for r in v.requests] == ["near", "far", "escape"]
    # object stores: the manifest's own bucket, not another
    assert guide_allowed("s3://b/guides/x.wav", "s3://b/m/pairs.parquet")
    assert not guide_allowed("s3://other/x.wav", "s3://b/m/pairs.parquet")
    assert not guide_allowed("/etc/passwd", "s3://b/m/pairs.parquet")
    assert guide_allowed("s3://other/g/x.wav", "s3://b/m.parquet", ["s3://other/g/"])
    assert not guide_allowed("s3://other/gx/x.wav", "s3://b/m.parquet", ["s3://other/g"])
    assert guide_allowed("http://h/x.wav", "s3://b/m.parquet", ["any"])


def test_the_run_validates_an_unchanged_manifest_once(tmp_path):
    """`pws-batch run` validates before creating the flow run and the flow's prepare again in the same process:
    the second call reuses the answer while the file is unchanged, and a changed file is validated anew."""
    from pws_batch.batch.config import RunConfig
    from pws_batch.batch.run import validate

    from pws_batch.batch.run import answers_reused

    path = tmp_path / "m.csv"
    path.write_text("image_prompt,audio_prompt\na castle,bells\n")
    config = RunConfig()
    with answers_reused():  # as `pws-batch run` does, for the whole command
        first, _ = validate(str(path), config)
        assert validate(str(path), config)[0] is first and len(first.requests) == 1
        assert validate(str(path), config.replace(defaults={"steps": 30}))[0] is not first  # other settings: anew
        path.write_text("image_prompt,audio_prompt\na castle,bells\na dog,barking\n")
        assert len(validate(str(path), config)[0].requests) == 2
    assert validate(str(path), config)[0] is not validate(str(path), config)[0]  # a later command asks anew


def test_the_run_fingerprints_an_unchanged_manifest_and_its_guides_once(tmp_path, monkeypatch):
    """Within one command, the CLI's check_output and the flow's read the manifest and hash its guides once while
    the manifest file is unchanged; a changed manifest, or a later command, fingerprints anew."""
    import numpy as np
    import soundfile as sf

    from pws_batch.batch import run
    from pws_batch.batch.config import RunConfig

    sf.write(tmp_path / "guide.wav", np.zeros(1600, dtype=np.float32), 16000)
    path = tmp_path / "m.csv"
    path.write_text("image_prompt,audio_prompt,guide_audio\na castle,bells,guide.wav\n")
    calls = []
    real = run.guides_fingerprint
    monkeypatch.setattr(run, "guides_fingerprint", lambda *a, **k: calls.append(1) or real(*a, **k))
    out, config = str(tmp_path / "out"), RunConfig()
    with run.answers_reused():
        first = run.check_output(str(path), out, config)
        assert run.check_output(str(path), out, config) == first and len(calls) == 1
        path.write_text("image_prompt,audio_prompt,guide_audio\na castle,bells,guide.wav\na dog,barking,\n")
        second = run.check_output(str(path), out, config)
        assert len(calls) == 2 and second["manifest_sha256"] != first["manifest_sha256"]
    run.check_output(str(path), out, config)
    assert len(calls) == 3  # a later command hashes the guides anew (they may have changed)


def test_the_same_manifest_spelled_another_way_has_the_same_guides_fingerprint(tmp_path, monkeypatch):
    """A run interrupted as `run manifests/m.csv` resumes as `run /abs/manifests/m.csv` or from the manifest's own
    folder: guides beside the manifest are fingerprinted by their place from it (the path from the current folder
    made the resume refused as 'other settings (different: guides_sha256)'); their content still counts."""
    import numpy as np
    import soundfile as sf

    from pws_batch.batch import run
    from pws_batch.batch.config import RunConfig

    folder = tmp_path / "manifests"
    (folder / "guides").mkdir(parents=True)
    sf.write(folder / "guides" / "g.wav", np.zeros(1600, dtype=np.float32), 16000)
    (folder / "m.csv").write_text("image_prompt,audio_prompt,guide_audio\na castle,bells,guides/g.wav\n")
    config = RunConfig()
    monkeypatch.chdir(tmp_path)
    relative = run.guides_fingerprint("manifests/m.csv", config)
    assert run.guides_fingerprint(str(folder / "m.csv"), config) == relative
    monkeypatch.chdir(folder)
    assert run.guides_fingerprint("m.csv", config) == relative
    (folder / "m.csv").write_text(f"image_prompt,audio_prompt,guide_audio\na castle,bells,{folder}/guides/g.wav\n")
    assert run.guides_fingerprint("m.csv", config) == relative  # an absolute guide beside a relative manifest
    sf.write(folder / "guides" / "g.wav", np.ones(1600, dtype=np.float32) * 0.5, 16000)
    assert run.guides_fingerprint("m.csv", config) != relative


def test_a_flow_that_cannot_read_its_manifest_or_write_its_out_says_so_in_one_line(tmp_path):
    """A submitted run is checked on the submitting machine; the flow on a worker may still find the manifest gone
    (or not on its storage) or --out unwritable: one line naming it and the fix, not a bare OSError."""
    from pws_batch.batch import run
    from pws_batch.batch.config import RunConfig, RunError
    from pws_batch.batch.manifest import manifest_fingerprint

    with pytest.raises(ManifestError, match="cannot read manifest .*gone.csv .*storage every worker shares"):
        manifest_fingerprint(str(tmp_path / "gone.csv"))
    path = tmp_path / "m.csv"
    path.write_text("image_prompt,audio_prompt\na castle,bells\n")
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    with pytest.raises(RunError, match="cannot write to --out .*a-file/out"):
        run.prepare(str(path), str(blocked / "out"), RunConfig(), log=lambda line: None)


def test_a_file_that_is_not_what_its_name_says_is_named_for_what_it_looks_like(tmp_path):
    """Any name but .csv / .jsonl / .json is read as Parquet: a CSV named .parquet (or with no extension) said
    'Parquet magic bytes not found in footer'; a guide that is no picture named an in-memory buffer."""
    for name, text, words in (("m.parquet", "image_prompt,audio_prompt\na,b\n", "looks like CSV: name it .csv"),
                              ("m", '{"image_prompt": "a", "audio_prompt": "b"}\n', "looks like JSON: name it .jsonl"),
                              ("e.parquet", "", "the file is empty")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ManifestError, match=words):
            read_manifest(str(tmp_path / name))
    (tmp_path / "g.png").write_text("hello")
    (tmp_path / "gi.csv").write_text("image_prompt,audio_prompt,guide_image\na,b,g.png\n")
    v = validate(read_manifest(str(tmp_path / "gi.csv")), base=str(tmp_path))
    assert "not a picture PIL can read" in v.rejections[0].reason and "BytesIO" not in v.rejections[0].reason
