"""`pws-batch export OUT DIR --format files` and the offline parts of `pws-batch push` (issue 10, item 4)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from dataset_maker import HEIGHT, RATE, WIDTH, make_dataset
from pws_batch.cli import main


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("export") / "m.parquet"
    pq.write_table(pa.table({"image_prompt": [f"a picture {i}" for i in range(5)],
                             "audio_prompt": [f"a sound {i}" for i in range(5)],
                             "notes": [None, None, "x", "y", None]}), path)
    return str(path)


@pytest.mark.parametrize("audio_format", ["wav", "flac"])
def test_export_writes_an_img2dataset_style_folder(manifest, tmp_path, audio_format, capsys):
    out, dest = str(tmp_path / "out"), str(tmp_path / "files")
    make_dataset(manifest, out, shard_size=2, audio_format=audio_format)
    assert main(["export", out, dest, "--format", "files"]) == 0
    assert "exported 5 rows" in capsys.readouterr().out
    names = sorted(os.listdir(dest))
    assert names == sorted(f"{i:05d}.{ext}" for i in range(5) for ext in ("png", audio_format, "json"))
    with Image.open(os.path.join(dest, "00000.png")) as im:
        assert im.size == (WIDTH, HEIGHT) and im.mode == "L"
    info = sf.info(os.path.join(dest, f"00004.{audio_format}"))
    assert info.samplerate == RATE and info.channels == 1 and info.format == audio_format.upper()
    records = [json.load(open(os.path.join(dest, f"{i:05d}.json"))) for i in range(5)]
    assert [r["manifest_row"] for r in records] == [0, 1, 2, 3, 4]  # part order
    assert [r["notes"] for r in records] == [None, None, "x", "y", None]
    assert {"pair_id", "image_prompt", "audio_prompt", "seed", "clip_score", "clap_score"} <= set(records[0])
    assert "image" not in records[0] and "audio" not in records[0]


def test_export_refuses_a_folder_holding_an_earlier_export_unless_overwrite(manifest, tmp_path, capsys):
    out, dest = str(tmp_path / "out"), tmp_path / "files"
    make_dataset(manifest, out, shard_size=2)
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    (dest / "00099.json").write_text("{}")  # a row of an earlier, larger export
    capsys.readouterr()
    assert main(["export", out, str(dest)]) == 2
    err = capsys.readouterr().err
    assert "already holds 1 exported files (00099.json" in err and "--overwrite" in err
    assert sorted(os.listdir(dest)) == ["00099.json", "notes.txt"]  # nothing written, nothing lost
    assert main(["export", out, str(dest), "--overwrite"]) == 0
    names = sorted(os.listdir(dest))
    assert names == sorted(["notes.txt", *(f"{i:05d}.{ext}" for i in range(5) for ext in ("png", "wav", "json"))])
    assert (dest / "notes.txt").read_text() == "mine"


def test_export_into_the_dataset_itself_or_onto_a_file_is_one_line(manifest, tmp_path, capsys):
    out = str(tmp_path / "out")
    make_dataset(manifest, out, shard_size=2)
    capsys.readouterr()
    assert main(["export", out, out + "/"]) == 2
    assert "is the dataset's own folder" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["export", out, str(blocker)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pws-batch export: error: ")
    assert main(["gallery", out, "--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pws-batch gallery: error: ")
    assert sorted(os.listdir(out)) == ["README.md", "_shards", "candidates", "card", "data", "rejected.parquet",
                                       "run.json"]


def test_export_of_no_dataset_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "files")]) == 2
    assert "holds no run.json" in capsys.readouterr().err


def test_push_uploads_the_dataset_files_and_needs_the_network(manifest, tmp_path, capsys, monkeypatch):
    from pws_batch.batch.export import push_files
    from pws_batch.batch.gallery import write_gallery

    out = str(tmp_path / "out")
    make_dataset(manifest, out, shard_size=2)
    write_gallery(out)
    files = push_files(out)
    assert "README.md" in files and "run.json" in files and "rejected.parquet" in files
    assert "card/clip_score.png" in files and "data/part-00002.parquet" in files
    assert "candidates/part-00000.parquet" in files
    assert not [f for f in files if f.startswith(("gallery/", "_shards/"))]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()  # what came before (building the tiny models, when this test runs alone)
    assert main(["push", out, "me/my-dataset"]) == 2
    err = capsys.readouterr().err
    assert "needs the network" in err and len(err.strip().splitlines()) == 1
    assert main(["push", str(tmp_path), "me/my-dataset"]) == 2
    assert "holds no run.json" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_dataset_is_named_by_inspect_and_refused_by_gallery_and_export(manifest, tmp_path, capsys, damage):
    """A part cut short (a copy interrupted) or deleted: inspect said 'complete' with exit 0; gallery and export
    failed on a bare 'Parquet magic bytes not found' after writing half their files, or left its rows out."""
    out = str(tmp_path / "out")
    make_dataset(manifest, out, shard_size=2)
    part = os.path.join(out, "data", "part-00001.parquet")
    if damage == "truncate":
        with open(part, "r+b") as f:
            f.truncate(100)
    else:
        os.remove(part)
    capsys.readouterr()
    assert main(["inspect", out]) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert "DAMAGED: 1 committed shard(s) do not match their markers" in first
    for args in (["gallery", out], ["export", out, str(tmp_path / "files")]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is damaged" in err and "part-00001.parquet" in err, err
    assert not os.path.exists(tmp_path / "files") or not os.listdir(tmp_path / "files")  # nothing half-written
    assert not os.path.exists(os.path.join(out, "gallery"))


def test_gallery_and_export_refuse_the_folders_the_datasets_readers_read_whole(manifest, tmp_path, capsys):
    """`gallery OUT --out OUT/data` put index.html among the parts: pandas.read_parquet(OUT/data) then failed."""
    import pandas as pd

    out = str(tmp_path / "out")
    make_dataset(manifest, out, shard_size=2)
    for args in (["gallery", out, "--out", os.path.join(out, "data")],
                 ["gallery", out, "--out", os.path.join(out, ".", "data")],
                 ["gallery", out, "--out", os.path.join(out, "card", "..", "data") + "/"],
                 ["export", out, os.path.join(out, "data", "files")],
                 ["export", out, os.path.join(out, "_shards")]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "inside the dataset's" in err, err
    assert len(pd.read_parquet(os.path.join(out, "data"))) == 5
    with open(os.path.join(out, "run.json"), "r+") as f:  # cut off mid-write
        f.truncate(40)
    assert main(["gallery", out]) in (1, 2)
    assert "run.json is unreadable" in capsys.readouterr().err


def test_push_to_an_unreachable_hub_says_so_in_one_line(manifest, tmp_path):
    """It printed 'pws-batch: error: ConnectError: [Errno -2] Name or service not known'."""
    import socket
    import subprocess
    import sys

    out = str(tmp_path / "out")
    make_dataset(manifest, out, shard_size=5)
    with socket.socket() as s:  # a port nothing listens at
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_TOKEN="hf_test")
    proc = subprocess.run([sys.executable, "-m", "pws_batch.cli", "push", out, "someone/birds"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot reach the Hugging Face Hub" in proc.stderr and "HF_ENDPOINT" in proc.stderr


def test_a_gallery_made_again_holds_only_its_own_media_and_an_unfinished_run_is_noted(manifest, tmp_path, capsys):
    """`gallery --top 2` after the full gallery left the other rows' media beside the new page; the gallery or
    export of an interrupted run said nothing of the rows it lacks; memory:// was 'open memory://g/index.html'."""
    out = str(tmp_path / "out")
    make_dataset(manifest, out, shard_size=2)
    assert main(["gallery", out]) == 0
    assert len(os.listdir(os.path.join(out, "gallery", "media"))) == 10
    assert main(["gallery", out, "--top", "2"]) == 0
    assert sorted(os.listdir(os.path.join(out, "gallery", "media"))) == ["00000.png", "00000.wav",
                                                                         "00001.png", "00001.wav"]
    assert "note:" not in capsys.readouterr().err  # a complete run: nothing to say
    run = json.load(open(os.path.join(out, "run.json")))
    json.dump({**run, "status": "running"}, open(os.path.join(out, "run.json"), "w"))
    for args in (["gallery", out], ["export", out, str(tmp_path / "files")]):
        assert main(args) == 0
        assert "is interrupted (the run that wrote it is gone" in capsys.readouterr().err  # no live lease
    assert main(["gallery", out, "--out", "memory://g"]) == 2
    assert "memory only" in capsys.readouterr().err


def test_a_gallery_into_a_folder_of_the_users_own_deletes_nothing_of_theirs(manifest, tmp_path):
    """Only an earlier page of ours has its media replaced: a folder the user gave keeps files it already held."""
    out, site = str(tmp_path / "out"), tmp_path / "site"
    make_dataset(manifest, out, shard_size=2)
    (site / "media").mkdir(parents=True)
    (site / "media" / "00042.png").write_bytes(b"the user's own")
    assert main(["gallery", out, "--top", "2", "--out", str(site)]) == 0
    assert (site / "media" / "00042.png").read_bytes() == b"the user's own"
    assert main(["gallery", out, "--top", "1", "--out", str(site / ".")]) == 0  # our page's media replaced
    assert sorted(os.listdir(site / "media")) == ["00000.png", "00000.wav", "00042.png"]


def test_inspect_of_an_intact_dataset_whose_name_says_damaged_passes(manifest, tmp_path, capsys):
    out = str(tmp_path / "DAMAGED-backup")
    make_dataset(manifest, out, shard_size=2)
    assert main(["inspect", out]) == 0
