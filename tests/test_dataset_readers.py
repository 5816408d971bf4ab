"""Every dataset a run can make loads in pandas, pyarrow and Hugging Face `datasets` (issue 10, item 1).

Real manifests with awkward pass-through columns (empty in every row of one shard, empty everywhere, of mixed
types, nested, timestamps) go through the real run pieces (prepare / process_shard / finalize, see
dataset_maker.py) with real pictures and sounds; the dataset is then read by each reader, and the card is
parsed by huggingface_hub and its loading snippet run as written.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from dataset_maker import HEIGHT, RATE, WIDTH, make_dataset
from pws_batch.batch.config import RunConfig


def prompts(n: int) -> dict:
    return {"image_prompt": [f"a picture {i}" for i in range(n)], "audio_prompt": [f"a sound {i}" for i in range(n)]}


@pytest.fixture
def parquet_manifest(tmp_path) -> str:
    """Typed pass-through columns: null in all of shard 0 then text, null everywhere, a struct, a list, a
    timestamp with a time zone and a date."""
    n = 5
    table = pa.table({
        **prompts(n),
        "late_notes": pa.array([None, None, "c", "d", None], pa.string()),
        "never": pa.array([None] * n, pa.null()),
        "meta": pa.array([{"source": f"s{i}", "weight": i / 2} for i in range(n)]),
        "tags": pa.array([["a", "b"], [], ["c"], None, ["d"]]),
        "captured": pa.array([dt.datetime(2024, 1, i + 1, 12, tzinfo=dt.timezone.utc) for i in range(n)],
                             pa.timestamp("us", tz="UTC")),
        "day": pa.array([dt.date(2024, 2, i + 1) for i in range(n)]),
        # whole numbers beside nulls (pandas' reader would make them 7.0, NaN), at the top and nested
        "count": pa.array([7, None, 8, None, 9], pa.int64()),
        "stats": pa.array([{"n": i if i % 2 else None} for i in range(n)], pa.struct([("n", pa.int32())])),
    })
    path = tmp_path / "typed.parquet"
    pq.write_table(table, path)
    return str(path)


@pytest.fixture
def jsonl_manifest(tmp_path) -> str:
    """Loosely typed pass-through columns: mixed scalars across shards (5, "x", 7), an all-null column, a
    number column empty in all of shard 0, and nested values of different shapes."""
    rows = [{"mixed": 5, "empty": None, "late_number": None, "shape": {"a": 1}, "count": 7},
            {"mixed": 6, "empty": None, "late_number": None, "shape": [1, 2], "count": None},
            {"mixed": "x", "empty": None, "late_number": 2.5, "shape": {"a": 2}},
            {"mixed": 7, "empty": None, "late_number": 3, "shape": None, "count": 9}]
    path = tmp_path / "loose.jsonl"
    with open(path, "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"image_prompt": f"a picture {i}", "audio_prompt": f"a sound {i}", **row}) + "\n")
    return str(path)


def part_schemas(out: str) -> list[pa.Schema]:
    return [pq.read_schema(os.path.join(out, "data", p)) for p in sorted(os.listdir(os.path.join(out, "data")))]


def load_with_datasets(out: str, cache: str):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=os.path.join(out, "data", "*.parquet"), split="train",
                               cache_dir=cache)
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["audio"], datasets.Audio) and ds.features["audio"].sampling_rate == RATE
    return ds.cast_column("audio", datasets.Audio(decode=False))


def check_media(ds) -> None:
    row = ds[0]
    assert row["image"].size == (WIDTH, HEIGHT)
    samples, rate = sf.read(io.BytesIO(row["audio"]["bytes"]))
    assert rate == RATE and samples.ndim == 1 and len(samples) == RATE


def test_typed_pass_through_columns_keep_their_types_in_every_reader(parquet_manifest, tmp_path):
    out = str(tmp_path / "out")
    summary = make_dataset(parquet_manifest, out, shard_size=2)
    assert summary["complete"] and summary["counts"]["kept"] == 5
    schemas = part_schemas(out)
    assert len(schemas) == 3 and all(s == schemas[0] for s in schemas[1:])  # one schema, metadata included
    schema = schemas[0]
    assert schema.field("late_notes").type == pa.string() and schema.field("never").type == pa.string()
    assert schema.field("meta").type == pa.struct([("source", pa.string()), ("weight", pa.float64())])
    assert schema.field("tags").type == pa.list_(pa.string())
    assert schema.field("captured").type == pa.timestamp("us", tz="UTC")
    assert schema.field("day").type == pa.date32()
    assert schema.field("count").type == pa.int64() and schema.field("stats").type == pa.struct([("n", pa.int64())])
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    assert features["audio"] == {"sampling_rate": RATE, "_type": "Audio"}
    assert set(features) == set(schema.names)

    df = pd.read_parquet(os.path.join(out, "data"))  # the README's recipe
    assert len(df) == 5 and df["late_notes"].tolist()[2:4] == ["c", "d"] and df["never"].isna().all()
    assert df["meta"].iloc[3] == {"source": "s3", "weight": 1.5}
    assert str(df["captured"].dt.tz) == "UTC"
    table = pads.dataset(os.path.join(out, "data"), format="parquet").to_table()
    assert table.num_rows == 5 and table.schema.field("tags").type == pa.list_(pa.string())
    by_row = table.sort_by("manifest_row")
    assert by_row["count"].to_pylist() == [7, None, 8, None, 9]
    assert by_row["stats"].to_pylist() == [{"n": None}, {"n": 1}, {"n": None}, {"n": 3}, {"n": None}]

    ds = load_with_datasets(out, str(tmp_path / "cache"))
    assert ds.num_rows == 5 and ds.features["meta"]["weight"].dtype == "float64"
    assert sorted(r["source"] for r in ds["meta"]) == [f"s{i}" for i in range(5)]
    check_media(ds)


def test_validate_names_the_pass_through_columns_run_will_write_as_text(tmp_path, capsys):
    """`validate` prints the warnings `run` logs; each says why: a number too large for int64 (never rounded to
    a float), a type the dataset keeps as text only, a Parquet map."""
    from decimal import Decimal

    from pws_batch.cli import main

    path = tmp_path / "odd.parquet"
    pq.write_table(pa.table({**prompts(3),
                             "huge": pa.array([2**63 + 5, None, 1], pa.uint64()),
                             "price": pa.array([Decimal("1.50"), Decimal("2.25"), None], pa.decimal128(5, 2)),
                             "attrs": pa.array([[("a", 1)], [], None], pa.map_(pa.string(), pa.int64())),
                             "fine": pa.array([1, None, 2], pa.int64())}), path)
    assert main(["validate", str(path), "--models", "tiny"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: pass-through")]
    assert len(lines) == 3, lines
    assert "'huge' has values that do not fit a 64-bit number" in lines[0]
    assert "'price' holds values of a type the dataset keeps as text only (Decimal)" in lines[1]
    assert "'attrs' holds maps" in lines[2]


def test_loose_pass_through_columns_become_text_with_a_warning_naming_them(jsonl_manifest, tmp_path):
    out = str(tmp_path / "out")
    summary = make_dataset(jsonl_manifest, out, shard_size=2)
    assert summary["complete"]
    warnings = [line for line in summary["logs"] if "pass-through column" in line]
    assert any("'mixed'" in w and "text" in w for w in warnings), summary["logs"]
    assert any("'shape'" in w and "JSON" in w for w in warnings), summary["logs"]
    assert not any("'empty'" in w or "'late_number'" in w for w in warnings)
    schemas = part_schemas(out)
    assert len(schemas) == 2 and schemas[0] == schemas[1]
    assert schemas[0].field("mixed").type == pa.string() and schemas[0].field("empty").type == pa.string()
    assert schemas[0].field("late_number").type == pa.float64()
    assert schemas[0].field("count").type == pa.int64()  # whole numbers beside missing ones stay whole

    df = pd.read_parquet(os.path.join(out, "data"))
    assert sorted(df["mixed"]) == ["5", "6", "7", "x"]
    assert [json.loads(v) if isinstance(v, str) else None for v in df.sort_values("manifest_row")["shape"]] == [{"a": 1}, [1, 2], {"a": 2}, None]
    ds = load_with_datasets(out, str(tmp_path / "cache"))
    assert ds.num_rows == 4 and ds.features["mixed"].dtype == "string"
    check_media(ds)
    # finalize read every part (the crash) and wrote the card; run.json says complete
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["status"] == "complete" and run["features"]["mixed"] == {"dtype": "string", "_type": "Value"}


def test_the_card_parses_with_huggingface_hub_and_its_snippet_runs(parquet_manifest, tmp_path):
    from huggingface_hub import DatasetCard

    out = str(tmp_path / "out")
    make_dataset(parquet_manifest, out, shard_size=2)
    card = DatasetCard.load(os.path.join(out, "README.md"))
    data = card.data.to_dict()
    assert data["license"] == "other" and data["license_name"]  # the tiny set: no known model terms
    assert data["task_categories"] == ["text-to-image", "text-to-audio"]
    assert data["size_categories"] == ["n<1K"]
    assert data["configs"] == [{"config_name": "default", "data_files": [{"split": "train",
                                                                          "path": "data/part-*.parquet"}]}]
    for score in ("clip_score", "clap_score"):  # the histograms are PNG files in the dataset
        assert f"](card/{score}.png)" in card.text
        with open(os.path.join(out, "card", f"{score}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| pair_id | image_prompt |" in card.text and "a picture 4" in card.text  # the sample table
    assert "256 x 992" in card.text
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    assert 'cast_column("audio", Audio(decode=False))' in snippet
    result = subprocess.run([sys.executable, "-c", snippet], cwd=out, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(992, 256) 16000 1.0 seconds" in result.stdout


def test_the_card_carries_the_models_terms():
    from huggingface_hub import DatasetCard

    from pws_batch.batch.card import dataset_card

    models = {"image": "stable-diffusion-v1-5/stable-diffusion-v1-5", "audio": "auffusion/auffusion-full-no-adapter"}
    card = DatasetCard(dataset_card("real", {"models": models, "config": RunConfig().to_dict()},
                                    [{"pair_id": "a|b", "clip_score": 0.3, "clap_score": 0.5}]))
    assert sorted(card.data.license) == ["cc-by-nc-sa-4.0", "creativeml-openrail-m"]
    assert "no commercial use" in card.text
    assert "a\\|b" in card.text  # table cells are escaped


def test_the_card_describes_the_media_and_settings_of_the_run_as_run_json_holds_them():
    """run.json's config is in sections (defaults, engine, plan, ranking): the card reads the canvas width and the
    audio format from there (or the rows), and lists every setting whole."""
    from pws_batch.batch.card import dataset_card

    config = RunConfig().replace(defaults={"crop_columns": 0}, engine={"vocoder": "griffin-lim"},
                                 plan={"audio_format": "flac", "overwrite": True}).to_dict()
    row = {"pair_id": "p", "image_prompt": "a fox <script>alert(1)</script> & <b>co</b>", "clip_score": 0.3,
           "clap_score": 0.5}
    card = dataset_card("run", {"config": config}, [row])
    assert "256 x 1024 grayscale canvas" in card and "16 kHz mono FLAC" in card
    assert "| engine.vocoder | griffin-lim |" in card and "| plan.audio_format | flac |" in card
    assert "| defaults.crop_columns | 0 |" in card and "…" not in card.split("## Generation settings")[1]
    assert "overwrite" not in card and "ray_address" not in card
    assert "<script>" not in card and "a fox &lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;co" in card
    # a manifest row may set its own crop: the rows say what the canvases are
    mixed = dataset_card("run", {"config": config}, [{**row, "crop_columns": 32}, {**row, "crop_columns": 0}])
    assert "256 x 992 to 1024 (per row: 1024 - crop_columns) grayscale canvas" in mixed


def test_a_flac_run_stores_lossless_flac_about_half_the_size(jsonl_manifest, tmp_path):
    wav_out, flac_out = str(tmp_path / "wav"), str(tmp_path / "flac")
    make_dataset(jsonl_manifest, wav_out)
    make_dataset(jsonl_manifest, flac_out, audio_format="flac")
    wav_row = pq.read_table(os.path.join(wav_out, "data", "part-00000.parquet")).to_pylist()[0]["audio"]
    flac_row = pq.read_table(os.path.join(flac_out, "data", "part-00000.parquet")).to_pylist()[0]["audio"]
    assert flac_row["path"].endswith(".flac") and sf.info(io.BytesIO(flac_row["bytes"])).format == "FLAC"
    a, _ = sf.read(io.BytesIO(wav_row["bytes"]), dtype="int16")
    b, _ = sf.read(io.BytesIO(flac_row["bytes"]), dtype="int16")
    assert (a == b).all()  # lossless
    print(f"FLAC/WAV size ratio: {len(flac_row['bytes']) / len(wav_row['bytes']):.2f}")
