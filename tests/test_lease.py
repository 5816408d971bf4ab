"""The lease on an output (pws_batch.batch.lease): one run at a time; a dead holder's lease is taken over.

Real processes and real files: a holder is a separate Python process that takes the lease and is then killed
with SIGKILL, as a crash would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from pws_batch.batch import lease
from pws_batch.batch.dataset import Output

HOLDER = """
import sys, time
from pws_batch.batch import lease
held = lease.acquire(sys.argv[1], "holder process", log=print)
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(params=["local", "memory"])
def uri(request, tmp_path) -> str:
    return str(tmp_path / "out") if request.param == "local" else f"memory://pws-lease/{uuid.uuid4().hex}"


def test_a_second_holder_is_refused_naming_the_first_and_release_frees_it(uri):
    notices: list[str] = []
    first = lease.acquire(uri, "run A", notices.append)
    try:
        t0 = time.perf_counter()
        with pytest.raises(lease.LeaseError) as info:
            lease.acquire(uri, "run B", notices.append)
        assert time.perf_counter() - t0 < 10
        text = str(info.value)
        assert "in use by run A" in text and socket.gethostname() in text and f"pid {os.getpid()}" in text
        assert "\n" not in text and "another --out" in text
        with pytest.raises(lease.LeaseError):
            lease.check_lease(uri)
    finally:
        first.release()
    assert lease.read_lease(Output(uri)) is None
    lease.check_lease(uri)  # free again
    with lease.acquire(uri, "run B", notices.append):
        assert lease.read_lease(Output(uri))["holder"] == "run B"
    assert notices == []  # nothing was taken over


def test_a_lease_whose_heartbeat_stopped_is_taken_over_with_a_notice(uri):
    out = Output(uri)
    old = time.time() - lease.STALE_S - 5
    out.write_json(lease.LEASE, {"holder": "a run on another machine", "host": "elsewhere.example", "pid": 1,
                                 "token": "t", "started_at": "2026-01-01T00:00:00+00:00", "heartbeat": old})
    notices: list[str] = []
    with lease.acquire(uri, "run B", notices.append):
        assert lease.read_lease(out)["holder"] == "run B"
    assert len(notices) == 1 and "taking over" in notices[0] and "elsewhere.example" in notices[0]
    assert "last heartbeat was" in notices[0]


def test_a_live_lease_on_another_host_is_respected(uri):
    out = Output(uri)
    out.write_json(lease.LEASE, {"holder": "a run on another machine", "host": "elsewhere.example", "pid": 1,
                                 "token": "t", "heartbeat": time.time()})
    with pytest.raises(lease.LeaseError, match="elsewhere.example"):
        lease.acquire(uri, "run B", print)


def test_the_heartbeat_renews_the_lease(uri, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.2)
    with lease.acquire(uri, "run A", print) as held:
        first = lease.read_lease(Output(uri))["heartbeat"]
        deadline = time.time() + 20
        while lease.read_lease(Output(uri))["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.1)
        assert lease.read_lease(Output(uri))["heartbeat"] > first
        assert lease.read_lease(Output(uri))["token"] == held.token


def test_the_lease_of_a_holder_killed_with_sigkill_is_taken_over(tmp_path):
    uri = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(lease.LeaseError, match=f"pid {proc.pid}"):
            lease.acquire(uri, "run B", print)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert json.loads(open(os.path.join(uri, lease.LEASE)).read())["pid"] == proc.pid  # left behind by the crash
    notices: list[str] = []
    with lease.acquire(uri, "run B", notices.append):
        assert lease.read_lease(Output(uri))["holder"] == "run B"
    assert len(notices) == 1 and "process is gone" in notices[0] and f"pid {proc.pid}" in notices[0]


def test_a_lease_cut_off_mid_write_does_not_block(uri):
    out = Output(uri)
    out.write_bytes(lease.LEASE, b'{"holder": "x", "ho')
    with lease.acquire(uri, "run B", print):
        assert lease.read_lease(out)["holder"] == "run B"
