"""The dataset writer (pws_batch.batch.dataset) and the run pieces around it (pws_batch.batch.run), on fsspec memory:// URIs.

Output's read / write / list / clear; the kept table's media columns, types and Hugging Face metadata; commit
markers (a truncated one does not count); the dataset card's YAML header; deterministic shard planning; a shard
processed with a fake generator and a run finalized from its markers.
"""

from __future__ import annotations

import json
import re
import uuid

import numpy as np
import pyarrow as pa
import pytest
import yaml

from pws_batch.batch.card import dataset_card
from pws_batch.batch.config import RunConfig
from pws_batch.batch.dataset import (KNOWN_TYPES, MEDIA, Output, candidates_table, committed_shards, kept_table)
from pws_batch.batch.manifest import Validated
from pws_batch.batch.pair import PairRequest, PairResult, ScoredCandidate
from pws_batch.batch.run import RunPlan, candidate_rows, finalize, kept_rows, plan_shards, process_shard
from pws_batch.core.params import GenerationParams

MODEL_IDS = {"image": "img/model", "audio": "aud/model", "vocoder": "voc", "clip": "clip/id", "clap": "clap/id"}
HF_DTYPES = {pa.int64(): "int64", pa.float64(): "float64", pa.string(): "string", pa.bool_(): "bool",
             pa.int32(): "int32", pa.float32(): "float32"}


@pytest.fixture
def uri() -> str:
    return f"memory://pws-test/{uuid.uuid4().hex}"


def request(i: int, keep: int = 2, extra: dict | None = None, pair_id: str | None = None) -> PairRequest:
    params = GenerationParams(f"picture {i}", f"sound {i}", num_candidates=3, seed=100 * i, steps=10,
                              guidance_image=7.5)
    return PairRequest(row=i, pair_id=pair_id or f"p{i}", params=params, keep=keep, extra=extra or {})


def fake_result(req: PairRequest) -> PairResult:
    """What the actors return for one pair: every candidate's scores, the kept ones with their media."""
    n = req.params.num_candidates
    candidates = []
    for c in range(n):
        kept = n - c <= req.keep
        candidates.append(ScoredCandidate(c, req.params.seed + c, 0.1 * c, 0.2 * c, n - c, kept,
                                          f"png-{req.pair_id}-{c}".encode() if kept else None,
                                          f"wav-{req.pair_id}-{c}".encode() if kept else None))
    return PairResult(req, candidates, generate_s=1.5, rank_s=0.25, unet_evals=40 * n)


# ------------------------------------------------------------------------------------------------ Output
def test_output_round_trips_tables_and_json(uri):
    out = Output(uri + "/")
    assert out.uri == uri
    table = pa.table({"a": [1, 2, 3], "b": ["x", None, "z"]})
    out.write_table("data/part-00000.parquet", table)
    assert out.read_table("data/part-00000.parquet").equals(table)
    out.write_json("run.json", {"status": "running", "n": 2, "nested": {"k": [1, 2]}})
    assert out.read_json("run.json") == {"status": "running", "n": 2, "nested": {"k": [1, 2]}}
    assert out.exists("run.json") and not out.exists("nothing.json")
    # a second output at another URI sees none of it
    assert not Output(uri + "-other").exists("run.json")


def test_output_list_gives_sorted_names_and_nothing_for_a_missing_folder(uri):
    out = Output(uri)
    assert out.list("_shards") == []
    for name in ("00002.json", "00000.json", "00001.json"):
        out.write_json(f"_shards/{name}", {})
    assert out.list("_shards") == ["00000.json", "00001.json", "00002.json"]


def test_output_clear_removes_only_its_own_entries(uri):
    out = Output(uri)
    out.write_table("data/part-00000.parquet", pa.table({"a": [1]}))
    out.write_table("candidates/part-00000.parquet", pa.table({"a": [1]}))
    out.write_json("_shards/00000.json", {})
    out.write_table("rejected.parquet", pa.table({"a": [1]}))
    out.write_json("run.json", {})
    out.write_bytes("README.md", b"card")
    out.write_bytes("notes.txt", b"someone else's file")
    out.write_bytes("extra/keep.bin", b"also theirs")
    out.clear()
    for rel in ("data", "candidates", "_shards", "rejected.parquet", "run.json", "README.md"):
        assert not out.exists(rel), rel
    assert out.exists("notes.txt") and out.exists("extra/keep.bin")
    out.clear()  # clearing an already clear output is fine


# ------------------------------------------------------------------------------------------------ kept table
def kept_rows_of(*requests: PairRequest) -> list[dict]:
    return [r for req in requests for r in kept_rows(fake_result(req), "00000", MODEL_IDS)]


def test_kept_rows_hold_one_row_per_kept_candidate_with_media_and_parameters():
    req = request(3, keep=2, extra={"notes": "hello"}, pair_id="p/3 x")
    rows = kept_rows_of(req)
    assert len(rows) == 2
    assert [r["rank"] for r in rows] == [1, 2]
    first = rows[0]
    assert first["pair_id"] == "p/3 x" and first["manifest_row"] == 3 and first["shard"] == "00000"
    assert first["candidate_index"] == 2 and first["seed"] == 302 and first["base_seed"] == 300
    # the path is file-name safe, and unique per pair_id: a changed id gets a digest of the original after "+"
    assert first["image"]["bytes"] == b"png-p/3 x-2"
    assert re.fullmatch(r"p_3_x\+[0-9a-f]{12}-002\.png", first["image"]["path"]), first["image"]["path"]
    assert first["audio"] == {"bytes": b"wav-p/3 x-2", "path": first["image"]["path"][:-4] + ".wav"}
    assert first["effective_image_prompt"] == req.params.effective_image_prompt
    assert first["guidance_image"] == 7.5 and first["keep"] == 2 and first["notes"] == "hello"
    assert {f"model_{k}": v for k, v in MODEL_IDS.items()}.items() <= first.items()
    assert first["unet_evals"] == 120 and first["generate_s"] == 1.5


def test_every_column_kept_rows_writes_is_known_or_reserved():
    """A manifest column named like any column the writer adds must be renamed, never overwrite it."""
    from pws_batch.batch.manifest import KNOWN, RESERVED

    written = set(kept_rows_of(request(0))[0])
    assert written - set(KNOWN) <= RESERVED, sorted(written - set(KNOWN) - RESERVED)


def test_kept_table_types_media_and_hugging_face_metadata():
    rows = kept_rows_of(request(0, extra={"notes": "a", "score": 3}), request(1, extra={"notes": "b", "score": 4}))
    table = kept_table(rows, KNOWN_TYPES)
    assert table.num_rows == 4
    for media in ("image", "audio"):
        t = table.schema.field(media).type
        assert pa.types.is_struct(t) and t == MEDIA
        assert [(f.name, f.type) for f in t] == [("bytes", pa.binary()), ("path", pa.string())]
    assert table["image"][0].as_py() == rows[0]["image"]
    # known columns typed by KNOWN_TYPES
    for name, expected in KNOWN_TYPES.items():
        if name in table.column_names:
            assert table.schema.field(name).type == expected, name
    assert table.schema.field("seed").type == pa.int64() and table.schema.field("t_image").type == pa.float64()
    assert table.schema.field("grayscale_suffix").type == pa.bool_()
    # pass-through columns as Arrow infers them
    assert table.schema.field("notes").type == pa.string() and table.schema.field("score").type == pa.int64()

    meta = json.loads(table.schema.metadata[b"huggingface"])
    features = meta["info"]["features"]
    assert features["image"]["_type"] == "Image" and features["audio"]["_type"] == "Audio"
    assert features["audio"]["sampling_rate"] == 16000
    assert list(features) == table.column_names
    for f in table.schema:
        if f.name not in ("image", "audio"):
            assert features[f.name]["_type"] == "Value", f.name
            assert features[f.name]["dtype"] == HF_DTYPES[f.type], f.name


def test_an_all_none_known_string_column_stays_string():
    rows = kept_rows_of(request(0))
    assert all(r["guide_audio"] is None and r["guide_image"] is None for r in rows)
    table = kept_table(rows, KNOWN_TYPES)
    for name in ("guide_audio", "guide_image"):
        assert table.schema.field(name).type == pa.string()
        assert table[name].null_count == table.num_rows
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["guide_audio"] == {"dtype": "string", "_type": "Value"}


def test_rows_missing_a_pass_through_key_get_nulls():
    rows = kept_rows_of(request(0, extra={"notes": "a"}), request(1))
    table = kept_table(rows, KNOWN_TYPES)
    assert table["notes"].to_pylist() == ["a", "a", None, None]


def test_a_pass_through_column_of_mixed_types_is_kept_as_text():
    rows = kept_rows_of(request(0, extra={"mixed": 5}), request(1, extra={"mixed": "five"}))
    table = kept_table(rows, KNOWN_TYPES)
    assert table.schema.field("mixed").type == pa.string()
    assert table["mixed"].to_pylist() == ["5", "5", "five", "five"]
    assert b"huggingface" in table.schema.metadata


def test_an_all_none_pass_through_column_keeps_the_hugging_face_metadata():
    table = kept_table(kept_rows_of(request(0, extra={"notes": None})), KNOWN_TYPES)
    assert b"huggingface" in (table.schema.metadata or {})


def test_kept_table_metadata_survives_a_parquet_round_trip(uri):
    out = Output(uri)
    table = kept_table(kept_rows_of(request(0)), KNOWN_TYPES)
    out.write_table("data/part-00000.parquet", table)
    back = out.read_table("data/part-00000.parquet")
    assert back.schema.field("image").type == MEDIA
    assert json.loads(back.schema.metadata[b"huggingface"]) == json.loads(table.schema.metadata[b"huggingface"])


def test_datasets_reads_image_and_audio_features(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "part-00000.parquet"
    import pyarrow.parquet as pq

    pq.write_table(kept_table(kept_rows_of(request(0)), KNOWN_TYPES), path)
    ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 2 and ds.features["pair_id"] == datasets.Value("string")
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["audio"], datasets.Audio)


def test_candidates_table_schema():
    table = candidates_table(candidate_rows(fake_result(request(0))))
    assert table.schema.names == ["pair_id", "candidate_index", "seed", "clip_score", "clap_score", "rank", "kept",
                                  "candidates_used"]
    assert table.num_rows == 3 and table["kept"].to_pylist() == [False, True, True]


# ------------------------------------------------------------------------------------------------ commits
def test_committed_shards_ignores_truncated_markers_and_other_files(uri):
    out = Output(uri)
    assert committed_shards(out) == {}
    out.write_json("_shards/00000.json", {"shard": "00000", "pair_ids": ["a"]})
    full = json.dumps({"shard": "00001", "pair_ids": ["b"]}).encode()
    out.write_bytes("_shards/00001.json", full[: len(full) // 2])  # cut off mid-write
    out.write_bytes("_shards/00002.json", b"")
    out.write_bytes("_shards/00003.json.tmp", full)
    out.write_bytes("_shards/notes.txt", b"x")
    assert committed_shards(out) == {"00000": {"shard": "00000", "pair_ids": ["a"]}}


# ------------------------------------------------------------------------------------------------ the card
def test_dataset_card_has_a_yaml_header_pointing_at_the_data_files():
    name = 'my "pairs": v1'
    run = {"counts": {"rows": 5, "pairs_done": 3, "rejected": 2, "candidates": 24, "kept": 6},
           "models": MODEL_IDS, "config": {"ranking": {"name": "reference"}}}
    kept = [{"clip_score": 0.2, "clap_score": 0.1}, {"clip_score": 0.4, "clap_score": None}]
    card = dataset_card(name, run, kept)
    assert card.startswith("---\n")
    header_text, body = card[4:].split("\n---\n", 1)
    header = yaml.safe_load(header_text)
    assert header["pretty_name"] == name
    assert header["configs"][0]["config_name"] == "default"
    assert header["configs"][0]["data_files"][0]["path"] == "data/part-*.parquet"
    assert "data/part-*.parquet" in header_text
    assert f"# {name}" in body
    assert "mean 0.3000, min 0.2000, max 0.4000" in body  # CLIP over the kept rows
    assert "mean 0.1000" in body  # CLAP: the missing score is left out
    assert all(v in body for v in MODEL_IDS.values())


def test_dataset_card_with_no_rows_says_n_a():
    card = dataset_card("empty", {}, [])
    assert card.startswith("---\n") and "n/a" in card
    yaml.safe_load(card[4:].split("\n---\n", 1)[0])


# ------------------------------------------------------------------------------------------------ planning
def test_plan_shards_is_deterministic_in_manifest_order():
    requests = [request(i) for i in range(10)]
    shards = plan_shards(requests, 4)
    assert [s.name for s in shards] == ["00000", "00001", "00002"]
    assert [s.pair_ids for s in shards] == [["p0", "p1", "p2", "p3"], ["p4", "p5", "p6", "p7"], ["p8", "p9"]]
    assert [r for s in shards for r in s.requests] == requests
    again = plan_shards([request(i) for i in range(10)], 4)
    assert [(s.name, s.pair_ids) for s in again] == [(s.name, s.pair_ids) for s in shards]


@pytest.mark.parametrize("n, size", [(0, 3), (1, 1), (5, 1), (5, 5), (5, 100), (12, 5)])
def test_plan_shards_sizes_and_names(n, size):
    shards = plan_shards([request(i) for i in range(n)], size)
    assert len(shards) == -(-n // size)
    assert [s.name for s in shards] == [f"{i:05d}" for i in range(len(shards))]
    assert all(len(s.requests) == size for s in shards[:-1])
    assert sum(len(s.requests) for s in shards) == n
    if shards:
        assert 1 <= len(shards[-1].requests) <= size


# ------------------------------------------------------------------------------------------------ a whole run
def fake_run_pairs(fail: set[str]):
    def run_pairs(requests):
        results = [PairResult.failed(r, f"boom {r.pair_id}") if r.pair_id in fail else fake_result(r)
                   for r in requests]
        return results, {"host": "test", "actor": 0}
    return run_pairs


def test_process_shard_writes_parts_and_commits(uri):
    shard = plan_shards([request(0, extra={"notes": "n0"}), request(1)], 2)[0]
    stats = process_shard(uri, MODEL_IDS, shard, fake_run_pairs(fail={"p1"}))
    out = Output(uri)
    assert stats["shard"] == "00000" and stats["pair_ids"] == ["p0", "p1"]
    assert (stats["pairs"], stats["pairs_done"], stats["pairs_failed"]) == (2, 1, 1)
    assert stats["failed"] == [{"pair_id": "p1", "row": 1, "error": "boom p1"}]
    assert (stats["candidates"], stats["kept"], stats["unet_evals"]) == (3, 2, 120)
    assert stats["host"] == "test"
    assert committed_shards(out) == {"00000": json.loads(json.dumps(stats))}
    kept = out.read_table("data/part-00000.parquet")
    assert kept["pair_id"].to_pylist() == ["p0", "p0"] and kept["notes"].to_pylist() == ["n0", "n0"]
    assert b"huggingface" in kept.schema.metadata
    cands = out.read_table("candidates/part-00000.parquet")
    assert cands["pair_id"].to_pylist() == ["p0"] * 3


def test_process_shard_with_every_pair_failed_removes_a_stale_part(uri):
    out = Output(uri)
    out.write_table("data/part-00000.parquet", pa.table({"stale": [1]}))
    shard = plan_shards([request(0)], 1)[0]
    stats = process_shard(uri, MODEL_IDS, shard, fake_run_pairs(fail={"p0"}))
    assert stats["kept"] == 0 and stats["pairs_failed"] == 1
    assert not out.exists("data/part-00000.parquet")
    assert out.read_table("candidates/part-00000.parquet").num_rows == 0
    assert "00000" in committed_shards(out)


def test_finalize_counts_committed_shards_and_writes_the_card(uri):
    requests = [request(i) for i in range(5)]
    config = RunConfig().replace(plan={"shard_size": 2}, defaults={"keep": 2})
    shards = plan_shards(requests, 2)  # 00000: p0 p1, 00001: p2 p3, 00002: p4
    validated = Validated(requests, [], [], ["image_prompt", "audio_prompt"], num_rows=6)
    plan = RunPlan("memory://pws-test/my-pairs.csv", uri, config, validated, shards, {}, {"manifest_sha256": "x"},
                   MODEL_IDS)
    run_pairs = fake_run_pairs(fail={"p3"})
    for shard in shards[:2]:  # the last shard never runs
        process_shard(uri, MODEL_IDS, shard, run_pairs)
    summary = finalize(plan)
    counts = summary["counts"]
    assert summary["name"] == "my-pairs" and summary["complete"] is False
    assert (counts["rows"], counts["good"], counts["shards"], counts["shards_committed"]) == (6, 5, 3, 2)
    assert (counts["pairs_done"], counts["pairs_failed"], counts["pairs_missing"]) == (3, 1, 1)
    assert (counts["candidates"], counts["kept"]) == (9, 6)
    assert [f["pair_id"] for f in summary["failed"]] == ["p3"]
    assert sorted({r["pair_id"] for r in summary["kept_rows"]}) == ["p0", "p1", "p2"]
    assert all("image" not in r and "audio" not in r for r in summary["kept_rows"])
    out = Output(uri)
    run = out.read_json("run.json")
    assert run["status"] == "incomplete" and run["counts"] == counts
    assert run["shards"] == {s.name: s.pair_ids for s in shards}
    card = out.fs.cat(out.path("README.md")).decode()
    assert card.startswith("---\n") and "# my-pairs" in card

    process_shard(uri, MODEL_IDS, shards[2], run_pairs)
    summary = finalize(plan)
    assert summary["complete"] is True and summary["counts"]["pairs_missing"] == 0
    assert Output(uri).read_json("run.json")["status"] == "complete"
    kept_scores = np.array([r["clip_score"] for r in summary["kept_rows"]])
    assert len(kept_scores) == 8


# ------------------------------------------------------------------------------------------------ faults (issue 11)
@pytest.fixture(params=["local", "memory"])
def any_uri(request, tmp_path) -> str:
    return str(tmp_path / "out") if request.param == "local" else f"memory://pws-test/{uuid.uuid4().hex}"


def test_writes_are_whole_and_leave_no_temporary_files(any_uri):
    out = Output(any_uri)
    out.write_json("run.json", {"status": "running"})
    out.write_json("run.json", {"status": "complete", "n": list(range(1000))})
    out.write_json("_shards/00000.json", {"shard": "00000"})
    assert out.read_json("run.json")["status"] == "complete"
    assert out.list("") == ["_shards", "run.json"] and out.list("_shards") == ["00000.json"]


def test_a_marker_records_its_parts_and_verification_finds_a_cut_or_changed_part(any_uri):
    from pws_batch.batch.dataset import verify_shard

    stats = process_shard(any_uri, MODEL_IDS, plan_shards([request(0), request(1)], 2)[0], fake_run_pairs(set()),
                          fingerprint="f1")
    out = Output(any_uri)
    parts = stats["parts"]
    assert sorted(parts) == ["candidates/part-00000.parquet", "data/part-00000.parquet"]
    assert parts["data/part-00000.parquet"]["rows"] == 4 and parts["candidates/part-00000.parquet"]["rows"] == 6
    assert parts["data/part-00000.parquet"]["bytes"] == out.size("data/part-00000.parquet")
    assert stats["fingerprint"] == "f1"
    assert verify_shard(out, stats) is None
    data = out.read_bytes("data/part-00000.parquet")
    out.write_bytes("data/part-00000.parquet", data[: len(data) // 2])  # cut off
    assert "has" in verify_shard(out, stats) and "bytes" in verify_shard(out, stats)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    out.write_bytes("data/part-00000.parquet", bytes(flipped))  # same size, other bytes
    assert "checksum" in verify_shard(out, stats)
    out.fs.rm(out.path("data/part-00000.parquet"))
    assert "missing" in verify_shard(out, stats)


def _plan(uri: str, n: int = 4) -> RunPlan:
    requests = [request(i) for i in range(n)]
    config = RunConfig().replace(plan={"shard_size": 2}, defaults={"keep": 2})
    validated = Validated(requests, [], [], ["image_prompt", "audio_prompt"], num_rows=n)
    return RunPlan("memory://pws-test/my-pairs.csv", uri, config, validated, plan_shards(requests, 2), {},
                   {"manifest_sha256": "x"}, MODEL_IDS)


def test_finalize_does_not_count_a_shard_whose_part_was_cut_off(any_uri):
    plan = _plan(any_uri)
    for shard in plan.shards:
        process_shard(plan.out, MODEL_IDS, shard, fake_run_pairs(set()))
    out = Output(any_uri)
    data = out.read_bytes("data/part-00001.parquet")
    out.write_bytes("data/part-00001.parquet", data[:100])
    summary = finalize(plan)  # no crash reading the cut part
    assert summary["complete"] is False and summary["counts"]["shards_committed"] == 1
    assert summary["counts"]["pairs_missing"] == 2
    assert out.read_json("run.json")["status"] == "incomplete"


def test_a_failed_finalize_says_failed_with_the_reason_in_run_json(tmp_path):
    from pws_batch.batch.run import RunError

    out_dir = tmp_path / "out"
    plan = _plan(str(out_dir), 2)
    process_shard(plan.out, MODEL_IDS, plan.shards[0], fake_run_pairs(set()))
    (out_dir / "README.md").mkdir()  # the dataset card cannot be written there
    (out_dir / "README.md" / "x").write_text("in the way")
    with pytest.raises(RunError, match="finalize failed"):
        finalize(plan)
    run = json.loads((out_dir / "run.json").read_text())
    assert run["status"] == "failed" and run["error"].startswith("finalize failed: ") and "README.md" in run["error"]


def test_a_truncated_run_json_is_one_line_for_inspect_and_read_run_json(any_uri, capsys):
    from pws_batch.batch.dataset import DatasetError, read_run_json
    from pws_batch.cli import main

    out = Output(any_uri)
    out.write_bytes("run.json", b'{"status": "running", "name": "pa')
    with pytest.raises(DatasetError, match="run again|pws-batch run` again"):
        read_run_json(out)
    if any_uri.startswith("memory://"):
        return  # the CLI runs in this process, but keep the check to a real path below
    assert main(["inspect", any_uri]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run.json is unreadable" in err and "Traceback" not in err


def test_inspect_tells_a_running_dataset_from_one_whose_run_died(tmp_path):
    from pws_batch.batch import lease
    from pws_batch.batch.summary import summarize

    out = str(tmp_path / "out")
    Output(out).write_json("run.json", {"status": "running", "name": "pairs", "shards": {}})
    with lease.acquire(out, "the live run", print):
        assert "pairs): running (the live run (host" in summarize(out).splitlines()[0]
    assert "pairs): interrupted (the run that wrote it is gone; run it again" in summarize(out).splitlines()[0]


def test_inspect_of_an_interrupted_run_counts_what_its_committed_shards_hold(tmp_path):
    """finalize never ran (Ctrl-C, a killed driver): run.json has no counts; inspect adds up the shards' markers."""
    import pandas as pd

    from dataset_maker import media_result
    from pws_batch.batch.run import prepare
    from pws_batch.batch.summary import summarize

    manifest, out = str(tmp_path / "m.csv"), str(tmp_path / "out")
    pd.DataFrame({"image_prompt": ["a", "b", "c", ""], "audio_prompt": ["x", "y", "z", "w"]}).to_csv(manifest,
                                                                                                    index=False)
    config = RunConfig().replace(engine={"models": "tiny"}, plan={"shard_size": 2},
                                 defaults={"num_candidates": 3, "steps": 10, "keep": 2})
    plan = prepare(manifest, out, config, log=lambda line: None)
    process_shard(out, plan.model_ids, plan.todo[0], lambda reqs: ([media_result(r) for r in reqs], {}))
    text = summarize(out)  # no lease: the run that wrote it is gone
    assert "interrupted" in text.splitlines()[0] and "shards       1/2 committed" in text
    assert "pairs        2 kept, 0 failed, 1 rejected rows, 1 not generated" in text
    assert "candidates   6 generated, 4 kept" in text
