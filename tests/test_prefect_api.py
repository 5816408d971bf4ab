"""The ephemeral Prefect API a `pws-batch run` starts (pws_batch.batch.prefect_api): a real Prefect server on
loopback, used by every thread of this process for the block, its queued logs sent before it stops, and the
settings as they were afterwards."""

from __future__ import annotations

import os

import pytest


SCRIPT = """
import json, os, sys, threading
import httpx
from prefect import flow, get_run_logger
from prefect.settings import get_current_settings
from pws_batch.batch.prefect_api import EphemeralApi, _drain_to, use_api

api = EphemeralApi.start(timeout=120)
server_imported = "prefect.server.api.server" in sys.modules

@flow(name="ephemeral-api-check", persist_result=False)
def check() -> str:
    from prefect.runtime import flow_run
    get_run_logger().info("hello from the flow")
    return str(flow_run.id)

seen = []
with use_api(api):
    thread = threading.Thread(target=lambda: seen.append(get_current_settings().api.url))
    thread.start(); thread.join()
    ui_url = get_current_settings().ui_url
    run_id = check()
    runs = httpx.post(f"{api.api_url}/flow_runs/filter", json={}).json()
    _drain_to(api)
    logs = httpx.post(f"{api.api_url}/logs/filter", json={}).json()
print(json.dumps({"server_imported": server_imported, "seen": seen, "api_url": api.api_url, "ui_url": ui_url,
                  "runs": [(r["id"], r["state_type"]) for r in runs], "run_id": run_id,
                  "logs": [entry["message"] for entry in logs], "stopped": api.process.poll() is not None,
                  "after": get_current_settings().api.url, "env": [k for k in ("PREFECT_API_URL", "PREFECT_UI_URL")
                                                                   if k in os.environ]}))
"""


@pytest.mark.slow
def test_the_ephemeral_api_serves_every_thread_gets_the_logs_and_is_stopped(tmp_path):
    """In a process of its own (as `pws-batch run`): the server's code is not imported there, every thread talks
    to it, a flow run and its logs land on it, and at the end it is stopped, the settings are back, and the process
    exits without retrying logs against a closed port."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Error logging to API" not in proc.stderr and "connection attempts failed" not in proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["server_imported"] and got["seen"] == [got["api_url"]] and got["ui_url"] == ""
    assert got["runs"] == [[got["run_id"], "COMPLETED"]] and "hello from the flow" in got["logs"]
    assert got["stopped"] and got["after"] is None and got["env"] == []


def test_a_server_that_exits_at_once_is_reported_not_waited_for(monkeypatch):
    from pws_batch.batch import prefect_api

    monkeypatch.setattr(prefect_api.sys, "executable", "/bin/false")  # the server "exits" with status 1
    with pytest.raises(prefect_api.EphemeralApiError, match="exited with status 1 before it answered"):
        prefect_api.EphemeralApi.start(timeout=60)


def test_a_port_answering_in_something_else_than_http_is_waited_past_then_the_server_stopped(monkeypatch):
    """Until the server binds its port another process may hold it (Ray takes ports as it starts): what answers
    there in binary is no health answer (http.client's BadStatusLine is no OSError), and when the time is up
    the server is stopped, not left running."""
    import socket
    import subprocess
    import sys
    import threading

    from pws_batch.batch import prefect_api

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def answer_binary() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.sendall(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00garbage\r\n\r\n")
            conn.close()

    threading.Thread(target=answer_binary, daemon=True).start()
    started, popen = [], subprocess.Popen

    def fake_popen(*args, **kwargs):  # a server that never binds its port
        started.append(popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return started[-1]

    monkeypatch.setattr(prefect_api, "_free_port", lambda: port)
    monkeypatch.setattr(prefect_api.subprocess, "Popen", fake_popen)
    try:
        with pytest.raises(prefect_api.EphemeralApiError, match="did not answer within 1 s"):
            prefect_api.EphemeralApi.start(timeout=1)
        assert started and started[0].poll() is not None  # stopped
    finally:
        listener.close()


@pytest.mark.slow
def test_the_server_stops_when_the_run_that_started_it_is_killed(tmp_path):
    """The server starts with SIGINT blocked (it must outlive a Ctrl-C until the run has recorded how it ended), so
    it relies on the run to stop it: a run killed (or crashed, or interrupted again during its clean-up) must not
    leave it running. Its own thread sees the parent gone and stops it."""
    import signal
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    code = ("import time; from pws_batch.batch.prefect_api import EphemeralApi; "
            "api = EphemeralApi.start(timeout=120); print(api.process.pid, flush=True); time.sleep(600)")
    run = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    server = None
    try:
        server = int(run.stdout.readline())
        assert _alive(server)
        run.kill()  # no clean-up at all
        run.wait()
        deadline = time.time() + 30
        while _alive(server) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(server), "the server outlived the run that started it"
    finally:
        run.kill()
        if server and _alive(server):
            os.kill(server, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (not a zombie: the killed run's orphan is reaped by init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
