"""Real servers for end-to-end tests, started on loopback and stopped by PID (never by name).

Every process is started in a session of its own; stopping it kills exactly the processes of that session
(a local Ray started by a run lives in the run's session), also when a test fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    pids = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return pids


def kill_session(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 20) -> None:
    """Kill every process of the session `proc` leads (it was started with start_new_session=True)."""
    sid = proc.pid
    for pid in session_pids(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.time() + timeout
    while session_pids(sid) and time.time() < deadline:
        time.sleep(0.2)
    for pid in session_pids(sid):  # anything that ignored the first signal
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def base_env(prefect_home: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PREFECT_HOME=prefect_home, PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1",
               PREFECT_LOGGING_LEVEL="INFO", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               # Ray replaces 127.0.0.1 by the machine's address unless told it is a single-machine cluster:
               # this keeps every Ray address of the tests on loopback.
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


@contextmanager
def prefect_server(home: str, ui: bool = False) -> Iterator[str]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME; yields the API URL."""
    port = free_port()
    env = base_env(home, PREFECT_UI_ENABLED="true" if ui else "false", PREFECT_SERVER_API_HOST="127.0.0.1",
                   PREFECT_SERVER_API_PORT=str(port))
    env.pop("PREFECT_API_URL", None)
    log = open(os.path.join(home, "server.log"), "wb")
    proc = subprocess.Popen([os.path.join(VENV_BIN, "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}; see {home}/server.log")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"prefect server did not answer within 120 s; see {home}/server.log")
            time.sleep(0.5)
        yield url
    finally:
        kill_session(proc, signal.SIGTERM)
        log.close()


def cli_with_server(folder, *args: str, timeout: float = 900) -> tuple[int, str]:
    """`pws-batch ARGS` against a Prefect server of its own (PREFECT_HOME under `folder`): exit status and output.
    Whatever the command leaves behind (its local Ray) is killed with its session."""
    home = os.path.join(str(folder), "prefect-home")
    os.makedirs(home, exist_ok=True)
    with prefect_server(home) as url:
        proc = subprocess.Popen([sys.executable, "-m", "pws_batch.cli", *args], env=base_env(home, PREFECT_API_URL=url),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        finally:
            kill_session(proc)
    return proc.returncode, output


def temp_folders(prefix: str) -> set[str]:
    """The folders named `prefix`* in the temporary directory (what a command left there)."""
    import glob
    import tempfile

    return set(glob.glob(os.path.join(tempfile.gettempdir(), prefix + "*")))


def api(url: str, path: str, body: dict | None = None) -> object:
    response = httpx.post(f"{url}{path}", json=body or {}, timeout=30)
    response.raise_for_status()
    return response.json()
