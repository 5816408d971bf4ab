"""End to end: `pws-batch run` with the tiny models, a real local Ray and a real Prefect API server on loopback.

A manifest with good and bad rows -> kept rows, rejected rows with reasons, candidates sidecar, shard markers,
dataset card; the Prefect API shows the flow run with one task run per shard and its artifacts; every actor
loaded its models once; a run killed after its first shard and run again gives the same dataset, no duplicates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from servers import api, base_env, kill_session, prefect_server

pytestmark = pytest.mark.slow

GOOD = [
    dict(pair_id="dogs", image_prompt="dogs", audio_prompt="dogs barking", keep=2, source="a"),
    dict(pair_id="police", image_prompt="a painting of police cars", audio_prompt="police siren",
         guidance_image=9.5, guidance_audio=7.0, source="b"),
    dict(pair_id="guided", image_prompt="sea landscape with ships", audio_prompt="birds singing softly",
         guide_audio="guide.wav", strength=0.5, source="c"),
    dict(pair_id="tigers", image_prompt="a colorful photo of tigers", audio_prompt="tiger growling", seed=7,
         source="d"),
    dict(pair_id="frogs", image_prompt="a water-lily pond", audio_prompt="frog croaking", t_image=1.0, source="e"),
]
BAD = [
    dict(pair_id="empty", image_prompt="  ", audio_prompt="x", source="bad"),  # empty prompt
    dict(pair_id="strong", image_prompt="x", audio_prompt="y", strength=2.0, guide_audio="guide.wav", source="bad"),
    dict(pair_id="dogs", image_prompt="again", audio_prompt="dogs", source="bad"),  # duplicate pair_id
    dict(pair_id="noaudio", image_prompt="x", audio_prompt=None, source="bad"),  # NaN / null prompt
    dict(pair_id="noguide", image_prompt="x", audio_prompt="y", guide_audio="missing.wav", source="bad"),
    dict(pair_id="alloff", image_prompt="x", audio_prompt="y", t_image=0.5, t_audio=0.5, source="bad"),
]
EXPECTED_REJECTED = {"empty": "image_prompt", "strong": "strength", "noaudio": "audio_prompt",
                     "noguide": "guide_audio", "alloff": "t_image"}
TIMING_COLUMNS = {"generate_s", "rank_s", "shard"}
ARGS = ["--models", "tiny", "--candidates", "3", "--steps", "4", "--shard-size", "2", "--micro-batch", "4"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("manifest")
    t = np.arange(16000 * 2) / 16000
    sf.write(folder / "guide.wav", 0.4 * np.sin(2 * np.pi * 880 * t), 16000)
    rows = GOOD[:2] + BAD[:3] + GOOD[2:] + BAD[3:]
    path = folder / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models):
    home = str(tmp_path_factory.mktemp("prefect-home"))
    with prefect_server(home) as url:
        yield url, home


def start_run(manifest: str, out: str, server, *extra: str) -> subprocess.Popen:
    url, home = server
    env = base_env(home, PREFECT_API_URL=url)
    log = open(out + ".log", "ab")
    return subprocess.Popen([sys.executable, "-m", "pws_batch.cli", "run", manifest, "--out", out, *ARGS, *extra],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_first_shard(proc: subprocess.Popen, out: str, timeout: float = 300) -> str:
    """Poll until the run commits shard 00000 (or dies); returns the marker's path."""
    marker = os.path.join(out, "_shards", "00000.json")
    deadline = time.time() + timeout
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return marker


def finish(proc: subprocess.Popen, out: str, timeout: float = 400) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        kill_session(proc)  # whatever it left behind (its local Ray), by PID
    with open(out + ".log") as f:
        return f.read()


@pytest.fixture(scope="module")
def first_run(manifest, server, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "full")
    proc = start_run(manifest, out, server)
    log = finish_ok(proc, out)
    return out, log


def read_data(out: str) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(out, "data")).sort_values(["pair_id", "rank"]).reset_index(drop=True)


def finish_ok(proc: subprocess.Popen, out: str) -> str:
    """The run's log once it has ended with exit status 0."""
    log = finish(proc, out)
    assert proc.returncode == 0, log[-4000:]
    return log


def run_json(out: str) -> dict:
    with open(os.path.join(out, "run.json")) as f:
        return json.load(f)


def assert_same_data(out: str, reference: str) -> None:
    """The kept rows of `out` equal the reference run's, but for timings."""
    data, expected = read_data(out), read_data(reference)
    assert not data.duplicated(["pair_id", "candidate_index"]).any()
    columns = [c for c in expected.columns if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(data[columns], expected[columns])


def test_kept_rows_rejected_rows_sidecar_markers_and_card(first_run):
    out, log = first_run
    assert f"dataset at {out}: 5 pairs kept, 0 failed, 6 rejected" in log
    # none of the libraries' start-up noise a user cannot act on (the run says where it runs in its own line)
    assert "requires torchvision (not installed)" not in log and "Token authentication is enabled" not in log
    assert "Started a local Ray instance" not in log and "Ray: started a local Ray at" in log
    # a shard queued behind another on the one worker says how much of its time was the wait
    assert "s of it waiting for the worker)" in log, log[-3000:]

    data = read_data(out)
    # keep defaults to 1; the "dogs" row asked for 2.
    assert sorted(data.pair_id) == ["dogs", "dogs", "frogs", "guided", "police", "tigers"]
    assert not data.duplicated(["pair_id", "candidate_index"]).any()
    assert list(data[data.pair_id == "dogs"]["rank"]) == [1, 2]
    assert set(data["rank"]) <= {1, 2}
    row = data[data.pair_id == "police"].iloc[0]
    assert row.image_prompt == "a painting of police cars" and row.effective_image_prompt.endswith(", grayscale")
    assert row.guidance_image == 9.5 and row.guidance_audio == 7.0 and row.steps == 4 and row.num_candidates == 3
    assert row.seed == row.base_seed + row.candidate_index  # the candidate's own seed
    assert row.source == "b"  # a pass-through column, untouched
    assert data[data.pair_id == "tigers"].iloc[0].base_seed == 7
    assert data[data.pair_id == "guided"].iloc[0].guide_audio.endswith("guide.wav")
    from pws_batch.core.tiny import TINY_VERSION

    assert set(data.model_image) == {os.path.join(os.environ["PWS_BATCH_HOME"], f"tiny-v{TINY_VERSION}", "image")}
    assert np.isfinite(data.clip_score).all() and (data.clap_score >= 0).all()

    # Media: PNG and WAV bytes in struct<bytes, path>, with the Hugging Face feature metadata.
    table = pq.read_table(os.path.join(out, "data", "part-00000.parquet"))
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"} and features["audio"] == {"_type": "Audio", "sampling_rate": 16000}
    image = table.column("image")[0].as_py()
    assert image["bytes"][:8] == b"\x89PNG\r\n\x1a\n" and image["path"].endswith(".png")
    audio, rate = sf.read(__import__("io").BytesIO(table.column("audio")[0].as_py()["bytes"]))
    assert rate == 16000 and audio.ndim == 1 and len(audio) == 992 * 160

    rejected = pd.read_parquet(os.path.join(out, "rejected.parquet"))
    assert len(rejected) == 6
    for pair_id, field in EXPECTED_REJECTED.items():
        hit = rejected[rejected.pair_id == pair_id]
        assert list(hit.field) == [field], (pair_id, hit.to_dict("records"))
        assert hit.iloc[0].reason
    dup = rejected[(rejected.pair_id == "dogs")]
    assert list(dup.field) == ["pair_id"] and "duplicate" in dup.iloc[0].reason and dup.iloc[0].row == 4

    candidates = pd.read_parquet(os.path.join(out, "candidates"))
    assert len(candidates) == 5 * 3 and candidates.kept.sum() == 6
    assert (candidates.groupby("pair_id")["rank"].apply(sorted).map(list) == [[1, 2, 3]] * 5).all()
    kept = candidates[candidates.kept].set_index(["pair_id", "candidate_index"])
    for _, r in data.iterrows():  # the kept rows are exactly the sidecar's kept candidates, same scores
        assert kept.loc[(r.pair_id, r.candidate_index)].clip_score == pytest.approx(r.clip_score)

    markers = sorted(os.listdir(os.path.join(out, "_shards")))
    assert markers == ["00000.json", "00001.json", "00002.json"]
    stats = [json.load(open(os.path.join(out, "_shards", m))) for m in markers]
    assert [s["pair_ids"] for s in stats] == [["dogs", "police"], ["guided", "tigers"], ["frogs"]]

    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\n") and "path: data/part-*.parquet" in card and "pairs kept: 5" in card

    run = run_json(out)
    assert run["status"] == "complete" and run["counts"]["rejected"] == 6 and run["counts"]["kept"] == 6
    assert run["versions"]["torch"].startswith("2.") and run["models"]["image"].endswith("image")
    # Each actor's process loaded its models once (in its constructor) and then served every pair of the run:
    # a load per pair (or per shard) would show as model_loads > 1.
    assert len(run["actors"]) == 2 and [a["model_loads"] for a in run["actors"]] == [1, 1]
    assert {a["role"] for a in run["actors"]} == {"generator", "ranker"}
    assert [a["pairs"] for a in run["actors"]] == [5, 5]


def test_dataset_loads_with_hugging_face_datasets(first_run):
    datasets = pytest.importorskip("datasets")
    out, _ = first_run
    ds = datasets.load_dataset("parquet", data_files=os.path.join(out, "data", "*.parquet"), split="train")
    assert type(ds.features["image"]).__name__ == "Image" and type(ds.features["audio"]).__name__ == "Audio"
    assert ds.num_rows == 6 and ds.features["clip_score"].dtype == "float64"
    assert ds.select_columns(["image"])[0]["image"].size == (992, 256)  # decoded by datasets as a PIL image
    # Decoding audio in datasets 5 needs torchcodec (no CPU build here): read the stored WAV bytes instead.
    raw = ds.cast_column("audio", datasets.Audio(decode=False))[0]["audio"]
    assert sf.info(__import__("io").BytesIO(raw["bytes"])).samplerate == 16000 and raw["path"].endswith(".wav")


def test_prefect_api_shows_the_flow_run_tasks_and_artifacts(first_run, server):
    out, _ = first_run
    url, _ = server
    run = run_json(out)
    flow_run = httpx_get(url, f"/flow_runs/{run['flow_run_id']}")
    assert flow_run["state_type"] == "COMPLETED" and flow_run["name"].startswith("pairs-")
    config = flow_run["parameters"]["config"]  # the whole typed run config is the flow's parameter
    assert config["engine"]["models"] == "tiny" and config["plan"]["shard_size"] == 2
    tasks = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["flow_run_id"]]}}})
    assert sorted(t["name"] for t in tasks) == ["shard-00000", "shard-00001", "shard-00002"]
    assert {t["state_type"] for t in tasks} == {"COMPLETED"}
    artifacts = api(url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["flow_run_id"]]}}})
    by_type = {}
    for a in artifacts:
        by_type.setdefault(a["type"], []).append(a)
    assert by_type["progress"][0]["data"] == 100.0
    table = by_type["table"][0]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert sorted(r["pair_id"] for r in table) == sorted(read_data(out).pair_id)
    markdowns = {a["key"].rsplit("-", 1)[-1]: a["data"] for a in by_type["markdown"]}
    summary = markdowns["summary"]
    gallery = markdowns["gallery"]  # the best kept pairs with thumbnails and players, bounded
    shown = gallery.count('<img src="data:image/png;base64,')  # the tiny models' noise sounds barely compress
    assert 1 <= shown <= 4 and gallery.count('<audio controls src="data:audio/flac;base64,') == shown
    assert f"{6 - shown} more in `pws-batch gallery" in gallery and len(gallery) <= 1_400_000
    assert "pairs kept | 5" in summary and "rows rejected | 6" in summary and out in summary
    logs = api(url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run["flow_run_id"]]}}})
    text = "\n".join(entry["message"] for entry in logs)
    assert "generator on " in text and "ranker on " in text and "device cpu" in text and "rejected row 2" in text


def httpx_get(url: str, path: str):
    import httpx

    response = httpx.get(f"{url}{path}", timeout=30)
    response.raise_for_status()
    return response.json()


def test_a_run_killed_after_its_first_shard_resumes_to_the_same_dataset(manifest, server, first_run, tmp_path):
    reference, _ = first_run
    out = str(tmp_path / "killed")
    proc = start_run(manifest, out, server)
    marker = wait_for_first_shard(proc, out)
    kill_session(proc)  # SIGKILL the run, its Ray and its actors, as a crash would
    assert os.path.exists(marker), "the run died before committing its first shard"
    committed = sorted(os.listdir(os.path.join(out, "_shards")))
    assert len(committed) < 3, "the run finished before it could be killed; nothing was tested"
    first_marker = open(marker).read()
    # A shard cut off mid-write: its part exists without its marker, and must be ignored and overwritten.
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    with open(os.path.join(out, "data", "part-00002.parquet"), "wb") as f:
        f.write(b"PAR1 half-written")

    again = start_run(manifest, out, server)
    finish_ok(again, out)
    assert open(marker).read() == first_marker  # the committed shard was skipped, not redone
    assert sorted(os.listdir(os.path.join(out, "_shards"))) == ["00000.json", "00001.json", "00002.json"]

    assert_same_data(out, reference)
    run = run_json(out)
    assert run["counts"]["shards_resumed"] == 1 or len(committed) == 2


def test_resume_refuses_a_different_manifest(manifest, first_run, server, tmp_path):
    out, _ = first_run
    other = tmp_path / "other.csv"
    pd.DataFrame([dict(image_prompt="x", audio_prompt="y")]).to_csv(other, index=False)
    proc = start_run(str(other), out, server)
    log = finish(proc, out)
    assert proc.returncode == 2
    assert "already holds a dataset made from another manifest" in log and "--overwrite" in log


def test_inspect_summarises_the_dataset(first_run, capsys):
    from pws_batch.cli import main

    out, _ = first_run
    assert main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert f"dataset {out} (pairs): complete" in text
    assert "3/3 committed" in text and "5 kept, 0 failed, 6 rejected rows" in text
    assert "15 generated, 6 kept" in text and "CLIP (kept)" in text and "CLAP (kept)" in text
    assert "rejected row 2: image_prompt: is empty" in text  # the row's prompt is whitespace


def test_a_generator_actor_killed_mid_run_is_restarted_and_the_run_completes(manifest, server, first_run, tmp_path):
    import psutil

    from servers import session_pids

    reference, _ = first_run
    out = str(tmp_path / "actor-killed")
    proc = start_run(manifest, out, server)
    marker = wait_for_first_shard(proc, out)
    assert os.path.exists(marker) and proc.poll() is None, "the run ended before its actor could be killed"
    # The worker actor is a process of this run's session (its local Ray): find it by PID and kill it.
    victims = [pid for pid in session_pids(proc.pid)
               if any(part.startswith("ray::Worker") for part in psutil.Process(pid).cmdline())]
    assert len(victims) == 1, [psutil.Process(p).cmdline() for p in session_pids(proc.pid)]
    os.kill(victims[0], 9)
    finish_ok(proc, out)
    run = run_json(out)
    assert run["status"] == "complete" and run["counts"]["pairs_done"] == 5
    assert_same_data(out, reference)


# ------------------------------------------------------------------------------------------------ faults (issue 11)
def test_a_corrupt_part_and_a_truncated_run_json_are_repaired_by_a_re_run(manifest, server, first_run, tmp_path):
    import shutil

    reference, _ = first_run
    out = str(tmp_path / "repaired")
    shutil.copytree(reference, out)
    part = os.path.join(out, "data", "part-00001.parquet")
    data = open(part, "rb").read()
    with open(part, "wb") as f:  # a committed part cut off after its marker was written
        f.write(data[: len(data) // 2])
    text = open(os.path.join(out, "run.json")).read()
    with open(os.path.join(out, "run.json"), "w") as f:  # run.json cut off mid-write
        f.write(text[: len(text) // 2])
    url, home = server
    inspect = subprocess.run([sys.executable, "-m", "pws_batch.cli", "inspect", out], capture_output=True, text=True,
                             env=base_env(home, PREFECT_API_URL=url), timeout=120)
    assert inspect.returncode == 1 and "Traceback" not in inspect.stderr
    assert "run.json is unreadable" in inspect.stderr and "pws-batch run` again" in inspect.stderr

    again = start_run(manifest, out, server)
    log = finish_ok(again, out)
    assert "shard 00001: data/part-00001.parquet has" in log and "regenerating it" in log
    run = run_json(out)
    assert run["status"] == "complete" and run["counts"]["shards_resumed"] == 2
    assert_same_data(out, reference)


def test_a_second_run_is_refused_and_the_lease_of_a_killed_run_is_taken_over(manifest, server, first_run, tmp_path):
    reference, _ = first_run
    url, home = server
    out = str(tmp_path / "leased")
    first = start_run(manifest, out, server)
    lease = os.path.join(out, "_lease.json")
    deadline = time.time() + 300
    while not os.path.exists(lease) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(lease) and first.poll() is None, "the first run never took the lease"
    holder = json.load(open(lease))
    second = subprocess.run([sys.executable, "-m", "pws_batch.cli", "run", manifest, "--out", out, *ARGS],
                            capture_output=True, text=True, env=base_env(home, PREFECT_API_URL=url), timeout=300)
    assert first.poll() is None, "the first run ended before the second was answered; nothing was tested"
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    refusal = second.stderr.strip().splitlines()[-1]
    assert "is in use by" in refusal and f"pid {holder['pid']}" in refusal and holder["host"] in refusal

    kill_session(first)  # kill -9 the holder, its Ray and its actors: the lease stays behind, unreleased
    assert json.load(open(lease))["pid"] == holder["pid"]
    third = start_run(manifest, out, server)
    log = finish_ok(third, out)
    assert f"taking over the lease on {out}" in log and "whose process is gone" in log
    assert not os.path.exists(lease)  # released at the end
    assert_same_data(out, reference)


def test_inspect_repeated_ten_times_exits_0(first_run, server):
    out, _ = first_run
    url, home = server
    for attempt in range(10):
        proc = subprocess.run([sys.executable, "-m", "pws_batch.cli", "inspect", out], capture_output=True, text=True,
                              env=base_env(home, PREFECT_API_URL=url), timeout=120)
        assert proc.returncode == 0, (attempt, proc.returncode, proc.stderr[-2000:])
        assert "3/3 committed" in proc.stdout


def test_a_run_started_while_the_cores_are_busy_completes(tmp_path, tiny_models):
    """Prefect's ephemeral server (no PREFECT_API_URL, a PREFECT_HOME that does not exist yet) on a machine whose
    cores are all busy with another job: the run still starts and completes."""
    manifest = tmp_path / "one.csv"
    pd.DataFrame([dict(pair_id="busy", image_prompt="dogs", audio_prompt="barking")]).to_csv(manifest, index=False)
    busy_loop = "import time\nend = time.time() + 400\nwhile time.time() < end:\n    pass\n"
    hogs = [subprocess.Popen([sys.executable, "-c", busy_loop], start_new_session=True)
            for _ in range(min(len(os.sched_getaffinity(0)), 4))]  # every core this process may use
    try:
        env = base_env(str(tmp_path / "prefect" / "new-home"))
        env.pop("PREFECT_API_URL", None)
        env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
        out = str(tmp_path / "out")
        proc = subprocess.run([sys.executable, "-m", "pws_batch.cli", "run", str(manifest), "--out", out, "--models",
                               "tiny", "--candidates", "1", "--steps", "2"], capture_output=True, text=True, env=env,
                              timeout=600, start_new_session=True)
        assert all(h.poll() is None for h in hogs), "the busy loops ended before the run did; nothing was tested"
    finally:
        for h in hogs:
            kill_session(h)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"dataset at {out}: 1 pairs kept" in proc.stdout


def test_weights_that_do_not_load_in_the_actors_end_the_run_in_one_line(manifest, server, tiny_models, tmp_path):
    """Files that pass `models check` but do not load: one line in the log and in run.json, not a traceback per
    actor restart, and run.json does not stay "running". (A whole torch.save zip, which the check passes, holding
    an object torch.load(weights_only=True) refuses: a garbage file now fails the check itself.)"""
    import argparse
    import shutil

    import torch

    broken = tmp_path / "clap"
    shutil.copytree(os.path.join(tiny_models, "clap"), broken)
    torch.save({"x": argparse.Namespace()}, broken / "pytorch_model.bin")
    model_set = tmp_path / "model_set.json"
    model_set.write_text(json.dumps({"name": "broken-clap", **{c: os.path.join(tiny_models, c) for c in
                                                               ("image", "audio", "clip")},
                                     "vocoder": os.path.join(tiny_models, "audio"), "clap": str(broken)}))
    out = str(tmp_path / "out")
    proc = start_run(manifest, out, server, "--models", str(model_set))
    log = finish(proc, out)
    assert proc.returncode == 1, log[-4000:]
    line = f"cannot load the clap model '{broken}'"
    assert f"the actors could not load their models: {line}" in log
    assert log.count("RayActorError") == 0 and log.count("ActorDiedError") == 0
    assert log.count("Traceback") <= 1  # Prefect's own report of the failed flow run, nothing from the actors
    assert f"dataset at {out}: 0 pairs kept, 0 failed, 6 rejected (5 pairs not generated: " in log
    with open(os.path.join(out, "run.json")) as f:
        record = json.load(f)
    assert record["status"] == "incomplete" and record["counts"]["pairs_missing"] == 5
    assert len(record["errors"]) == 1 and record["errors"][0].startswith(f"models not loaded: {line}")
