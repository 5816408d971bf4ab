"""Prefect's ephemeral API server for one `pws-batch run`, started without importing Prefect's server here.

Prefect starts its ephemeral server (`SubprocessASGIServer`) after importing its whole server package into the
calling process only to reach that class: ~5 s of CPU on a 2-core machine, on the start-up's critical path,
before the server's own process imports the same again. `EphemeralApi.start` runs the same command Prefect runs
(uvicorn on loopback, `prefect.server.api.server:create_app`, the ephemeral services, no UI) and waits for its
health check; `use_api` points this process's Prefect at it for the length of one command.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator


# The server's process runs uvicorn as `python -m uvicorn` would, plus a thread that stops it (SIGTERM: uvicorn's
# graceful shutdown; then for good) once the process that started it is gone: it starts with SIGINT blocked, so a
# run killed, crashed, or interrupted again during its clean-up would otherwise leave it running.
_SERVE_WHILE_PARENT_LIVES = """
import os, signal, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    os._exit(1)
threading.Thread(target=watch, name="parent-watch", daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[2:]]
from uvicorn.main import main
main()
"""


class EphemeralApiError(RuntimeError):
    """The server exited or did not answer in time (the message says which)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EphemeralApi:
    def __init__(self, process: subprocess.Popen, port: int):
        self.process, self.port = process, port

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @classmethod
    def start(cls, timeout: float) -> "EphemeralApi":
        """Start the server and wait until it answers (EphemeralApiError, with nothing left running, if not)."""
        spec = importlib.util.find_spec("prefect")
        if spec is None or spec.origin is None:
            raise EphemeralApiError("prefect is not installed")
        site = os.path.dirname(os.path.dirname(spec.origin))
        port = _free_port()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        # Started with SIGINT blocked (the child keeps this thread's signal mask; Ray starts its processes so too):
        # a Ctrl-C in the terminal reaches the whole process group, and the server must outlive it until the run
        # has recorded how it ended; `stop` ends it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            process = subprocess.Popen([sys.executable, "-c", _SERVE_WHILE_PARENT_LIVES, str(os.getpid()),
                                        "--app-dir", site, "--factory",
                                        "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
                                        str(port), "--log-level", "error", "--lifespan", "on"], env=env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        api = cls(process, port)
        try:
            api._wait_healthy(timeout)
        except BaseException:  # an interrupt too: nothing is left running
            api.stop()
            raise
        return api

    def _wait_healthy(self, timeout: float) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise EphemeralApiError(f"the server exited with status {self.process.returncode} before it "
                                        f"answered")
            try:
                with opener.open(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            # not up yet; or, until ours binds the port, another process that took it meanwhile and answers in
            # something else than HTTP (http.client's BadStatusLine is no OSError)
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise EphemeralApiError(f"the server did not answer within {timeout:g} s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # first: an interrupt while waiting below leaves it stopping
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _drain_to(api: EphemeralApi, timeout: float = 30) -> None:
    """Send the logs and events still queued for `api` before it stops (else they are retried against a closed
    port when the process exits, for a minute or more)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=timeout, at_exit=False)
        except Exception:  # noqa: BLE001 - what could not be sent is lost with the ephemeral API anyway
            pass


@contextmanager
def use_api(api: EphemeralApi) -> Iterator[None]:
    """This process's Prefect (every thread) talks to `api` until the block ends; then the settings are as before
    and the server is stopped."""
    from prefect.context import refresh_global_settings_context

    values = {"PREFECT_API_URL": api.api_url, "PREFECT_UI_URL": ""}  # no UI link in the logs: it serves no UI
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    refresh_global_settings_context()
    try:
        yield
    finally:
        try:
            _drain_to(api)
        finally:  # a second Ctrl-C during the drain still stops the server
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            refresh_global_settings_context()
            api.stop()
