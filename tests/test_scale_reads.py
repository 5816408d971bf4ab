"""At scale, the end of a run reads no media: finalize (card, counts, the flow's top-K table) and `inspect` read
only the score and prompt columns of the data parts; the artifacts' table is bounded; --shard-size auto keeps
the number of Prefect tasks bounded."""

from __future__ import annotations

import re
import uuid
from typing import Callable

import pytest

from pws_batch.batch import run as run_mod
from pws_batch.batch.config import RunConfig
from pws_batch.batch.dataset import Output
from pws_batch.batch.gallery import read_rows
from pws_batch.batch.manifest import Validated
from pws_batch.batch.pair import PairRequest, PairResult, ScoredCandidate
from pws_batch.batch.run import (RunPlan, auto_shard_size, finalize, plan_shards, process_shard, top_kept,
                                 write_run_json)
from pws_batch.batch.summary import summarize
from pws_batch.core.params import GenerationParams

MODEL_IDS = {"image": "i", "audio": "a", "vocoder": "v", "clip": "c", "clap": "l"}


def result(req: PairRequest) -> PairResult:
    n = req.params.num_candidates
    candidates = [ScoredCandidate(c, req.params.seed + c, 0.01 * req.row + 0.1 * c, 0.2 * c, n - c, n - c <= req.keep,
                                  b"png" if n - c <= req.keep else None, b"wav" if n - c <= req.keep else None)
                  for c in range(n)]
    return PairResult(req, candidates, unet_evals=10 * n)


def write_dataset(pair_ids: list[str], shard_size: int, make: Callable[[PairRequest], PairResult]) -> RunPlan:
    """A dataset in memory:// of one pair per id (3 candidates, keep 1), each pair's result from `make`."""
    uri = f"memory://pws-scale/{uuid.uuid4().hex}"
    requests = [PairRequest(i, pair, GenerationParams(f"picture {i}", f"sound {i}", num_candidates=3, seed=i), keep=1)
                for i, pair in enumerate(pair_ids)]
    shards = plan_shards(requests, shard_size)
    plan = RunPlan("memory://pws-scale/m.parquet", uri, RunConfig(), Validated(requests, [], [], [], len(requests)),
                   shards, {}, {}, MODEL_IDS, shard_size=shard_size)
    write_run_json(plan, "running")
    for shard in shards:
        process_shard(uri, MODEL_IDS, shard, lambda reqs: ([make(r) for r in reqs], {"worker": 0}))
    return plan


@pytest.fixture
def dataset():
    return write_dataset([f"p{i}" for i in range(60)], 7, result)


def test_finalize_and_inspect_never_read_media_columns(dataset, monkeypatch):
    """Every Parquet read of the dataset goes through Output.read_table (which decodes only the columns asked
    for): watched there, no data part is read whole or with its media columns."""
    reads: list[tuple[str, list | None]] = []
    real = Output.read_table

    def watched(self, rel, columns=None):
        reads.append((rel, columns))
        if "part-" in rel and rel.startswith("data/") and (columns is None or {"image", "audio"} & set(columns)):
            raise AssertionError(f"read the media of {rel}: columns {columns}")
        return real(self, rel, columns=columns)

    monkeypatch.setattr(Output, "read_table", watched)
    whole = []
    real_bytes = Output.read_bytes
    monkeypatch.setattr(Output, "read_bytes", lambda self, rel: whole.append(rel) or real_bytes(self, rel))
    summary = finalize(dataset)
    assert summary["complete"] and summary["counts"]["kept"] == 60
    text = summarize(dataset.out)
    assert "180 generated, 60 kept" in text and "CLIP (kept)  mean" in text
    data_reads = [cols for name, cols in reads if name.startswith("data/part-")]
    # finalize (card and top-K table from one read) and inspect, each part once, all through read_table
    assert len(data_reads) == 2 * len(dataset.shards)
    assert all(cols and not {"image", "audio"} & set(cols) for cols in data_reads)
    assert not [rel for rel in whole if rel.startswith("data/")], whole  # no part read whole (e.g. to checksum it)


def test_finalize_reads_no_part_whole_and_still_drops_a_damaged_shard(dataset, monkeypatch):
    """finalize trusts the content checks already made (prepare's sha256 of resumed shards, the sha256 computed
    as this run wrote the others): it reads no part whole, yet a part that is missing or changed size does not
    count, and neither does a shard holding other pairs than planned."""
    whole: list[str] = []
    real = Output.read_bytes

    def read_bytes(self, rel):
        whole.append(rel)
        return real(self, rel)

    monkeypatch.setattr(Output, "read_bytes", read_bytes)
    assert finalize(dataset)["counts"]["shards_committed"] == len(dataset.shards)
    assert not [rel for rel in whole if "part-" in rel]
    out = Output(dataset.out)
    part = "candidates/part-00002.parquet"
    out.write_bytes(part, real(out, part)[:-1])
    marker = out.read_json("_shards/00004.json")
    out.write_json("_shards/00004.json", {**marker, "pair_ids": ["someone-else"]})
    counts = finalize(dataset)["counts"]
    assert counts["shards_committed"] == len(dataset.shards) - 2 and counts["pairs_missing"] == 14
    assert out.read_json("run.json")["status"] == "incomplete"


def test_the_artifact_table_is_the_top_k_without_media(dataset):
    finalize(dataset)
    top = top_kept(Output(dataset.out), k=5)
    assert len(top) == 5 and [r["pair_id"] for r in top] == ["p59", "p58", "p57", "p56", "p55"]
    assert set(top[0]) == set(run_mod.TOP_COLUMNS)


def test_the_card_the_artifact_table_and_the_gallery_share_one_order_of_the_best_rows():
    """Ties (and a NaN or missing score, counted 0) order by pair_id, then candidate_index, wherever "the best
    kept rows" are shown: finalize's table for the Prefect artifact, the card's sample and the gallery."""
    # pair: (candidate, clip, clap). p4, p2 and p1 tie at 1.0 (p4's NaN counts 0), in the manifest in that order;
    # p0 is lower (0.9, its CLIP missing); p3 is best.
    scores = {"p4": (0, float("nan"), 1.0), "p0": (0, None, 0.9), "p2": (1, 0.5, 0.5), "p3": (0, 1.5, 0.5),
              "p1": (2, 0.25, 0.75)}

    def one_kept(req: PairRequest) -> PairResult:
        index, clip, clap = scores[req.pair_id]
        return PairResult(req, [ScoredCandidate(index, req.params.seed + index, clip, clap, 1, True, b"png", b"wav")])

    plan = write_dataset(list(scores), 2, one_kept)
    uri = plan.out
    expected = ["p3", "p1", "p2", "p4", "p0"]
    assert [r["pair_id"] for r in finalize(plan)["kept_rows"]] == expected
    assert [r["pair_id"] for r in read_rows(Output(uri))] == expected
    assert [r["pair_id"] for r in read_rows(Output(uri), top=3)] == expected[:3]
    card = Output(uri).read_bytes("README.md").decode()
    sample = card[card.index("## Sample"):card.index("## Generation settings")]
    assert re.findall(r"^\| (p\d) \|", sample, re.MULTILINE) == expected


def test_auto_shard_size_bounds_the_number_of_tasks():
    assert auto_shard_size(4, 1) == 1 and auto_shard_size(1024, 32) == 8
    assert auto_shard_size(100_000, 64) == 256
    assert -(-100_000 // auto_shard_size(100_000, 64)) == 391  # Prefect tasks for 100k pairs on 64 actors
    assert auto_shard_size(10_000_000, 8) == run_mod.MAX_AUTO_SHARD and auto_shard_size(0, 4) == 1


def test_reading_some_columns_fetches_only_their_bytes(tmp_path):
    """Output.read_table with columns fetches the footer and those columns' chunks (ranged reads), not the media
    of the part; the table equals the one read whole, for every column set, over several row groups."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pws_batch.batch.dataset import read_parquet_bytes

    rng = np.random.default_rng(0)
    n = 300
    table = pa.table({"pair_id": [f"p{i}" for i in range(n)], "clip_score": rng.random(n),
                      "kept": rng.random(n) > 0.5, "note": pa.array(["x" * (i % 7) for i in range(n)]).dictionary_encode(),
                      "image": [rng.bytes(20_000) for _ in range(n)],  # incompressible "media"
                      "audio": [rng.bytes(30_000) for _ in range(n)]})
    path = tmp_path / "part.parquet"
    pq.write_table(table, path, row_group_size=64)
    out = Output(str(tmp_path))
    fetched: list[int] = []
    real_cat_file = out.fs.cat_file

    def cat_file(p, start=None, end=None, **kw):  # every read of the file (cat_ranges reads through it)
        data = real_cat_file(p, start=start, end=end, **kw)
        fetched.append(len(data))
        return data

    out.fs.cat_file = cat_file
    whole = read_parquet_bytes(path.read_bytes())
    for columns in (["pair_id", "clip_score"], ["kept", "note"], ["clip_score", "not-a-column"], ["audio"]):
        fetched.clear()
        part = out.read_table("part.parquet", columns)
        names = [c for c in columns if c in table.column_names]
        assert part.equals(whole.select(names)), columns
        media = 50_000 * n if "audio" not in columns else 20_000 * n
        assert sum(fetched) < path.stat().st_size - media + 100_000, (columns, sum(fetched))
    fetched.clear()
    assert out.read_table("part.parquet", ["pair_id"]).num_rows == n and 0 < sum(fetched) < 200_000
    (tmp_path / "cut.parquet").write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="magic bytes"):
        out.read_table("cut.parquet", ["pair_id"])
