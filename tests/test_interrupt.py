"""Ctrl-C in a terminal (SIGINT to the whole process group) during `pws-batch run` with its ephemeral Prefect API
and local Ray: the run ends in seconds with one line, starts no second Ray, leaves no process behind, and a
re-run resumes from the committed shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from servers import base_env, kill_session, session_pids


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_to_the_process_group_ends_the_run_in_seconds_and_a_rerun_resumes(tmp_path, tiny_models, how):
    """Ctrl-C: SIGINT to the whole group; SIGTERM: to the run's process only (a scheduler's stop, `kill`), which
    ended with Ray's driver handler's status 15 and no word of its own."""
    manifest, out = tmp_path / "six.parquet", str(tmp_path / "out")
    pd.DataFrame({"image_prompt": [f"a cat {i}" for i in range(6)],
                  "audio_prompt": [f"meowing {i}" for i in range(6)]}).to_parquet(manifest, index=False)
    args = [sys.executable, "-m", "pws_batch.cli", "run", str(manifest), "--out", out, "--models", "tiny",
            "--candidates", "2", "--steps", "8", "--shard-size", "2"]
    env = base_env(str(tmp_path / "prefect-home"))
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        # its own session and process group, as a terminal's foreground job is
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while "shard 00000:" not in log_path.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: every process of the foreground group
        else:
            os.kill(proc.pid, signal.SIGTERM)
        t0 = time.time()
        returncode = proc.wait(timeout=60)
        ended_s = time.time() - t0
        deadline = time.time() + 30
        while session_pids(proc.pid) and time.time() < deadline:
            time.sleep(0.5)
        left = session_pids(proc.pid)
    finally:
        kill_session(proc)
    text = log_path.read_text()
    expected = (130, "pws-batch: interrupted") if how == "ctrl-c" else (143, "pws-batch: terminated (SIGTERM)")
    assert returncode == expected[0] and expected[1] in text, text[-3000:]
    assert ended_s < 30, f"{ended_s:.0f} s to end after Ctrl-C"
    # no second Ray from a late Ray call (which would start one with Ray's default logging: its start-up line)
    assert text.count("Ray: started a local Ray at") == 1 and "Started a local Ray instance" not in text, text[-3000:]
    assert "Failed to connect to GCS" not in text and "Unable to connect to 'ws://" not in text, text[-3000:]
    assert not left, f"processes left in the run's session: {left}"
    assert "Retry 1/" not in text, text[-3000:]  # a shard the stopping run took down is not retried

    done = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600, start_new_session=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "already committed" in done.stdout and "6 pairs kept" in done.stdout, done.stdout[-3000:]
    assert len(pd.read_parquet(os.path.join(out, "data"))) == 6
