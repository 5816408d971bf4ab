"""A lease on an output: one run at a time writes into OUT.

A run holds `OUT/_lease.json` (holder, host, pid, a token, and a heartbeat renewed every HEARTBEAT_S seconds)
for as long as it writes. Another run finds the lease and is refused with one line naming the holder. A lease
whose holder has died -- its process is gone (same host), or its heartbeat is older than STALE_S -- is taken
over, with a notice. Everything goes through fsspec, so it works on local disks, `memory://` and object stores.

Taking the lease is exclusive on local filesystems (a hard link that fails if the lease exists); on object
stores, which have no such operation, a run writes its lease, waits a moment and reads it back: of two runs
started in the same instant the one whose token is read back goes on, the other is refused.
"""

from __future__ import annotations

import atexit
import datetime as dt
import getpass
import json
import os
import socket
import threading
import time
import uuid
from typing import Callable

from pws_batch.batch.dataset import Output

LEASE = "_lease.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0  # six missed heartbeats: the holder is gone (or so stuck that it no longer writes)
SETTLE_S = 1.0  # object stores: how long a run waits before reading its lease back


class LeaseError(ValueError):
    """OUT is held by another live run."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def read_lease(out: Output) -> dict | None:
    """The lease in OUT, or None when there is none (an unreadable one counts as none: it was cut off)."""
    try:
        info = out.read_json(LEASE)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, OSError):
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def holder_state(info: dict, now: float | None = None) -> tuple[bool, str]:
    """(alive, description) of a lease's holder."""
    now = _now() if now is None else now
    age = now - float(info.get("heartbeat", 0))
    who = (f"{info.get('holder', 'a pws-batch run')} (host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
           f"user {info.get('user', '?')}, since {info.get('started_at', '?')})")
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
            and not _pid_alive(info["pid"]):
        return False, f"{who}, whose process is gone"
    if age > STALE_S:
        return False, f"{who}, whose last heartbeat was {age:.0f} s ago"
    return True, f"{who}, last heartbeat {max(age, 0):.0f} s ago"


def check_lease(uri: str) -> None:
    """Raise LeaseError when a live run holds OUT (a quick look, before any work; `acquire` decides)."""
    info = read_lease(Output(uri))
    if info is not None:
        alive, who = holder_state(info)
        if alive:
            raise LeaseError(_refusal(uri, who))


def _refusal(uri: str, who: str) -> str:
    return (f"{uri} is in use by {who}; wait until that run ends (or stop it), or choose another --out")


class Lease:
    """A held lease: renewed by a daemon thread until `release()` (or the process's normal exit)."""

    def __init__(self, out: Output, info: dict, log: Callable[[str], None]):
        self.out, self.info, self.log = out, info, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="pws-batch-lease", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    @property
    def token(self) -> str:
        return self.info["token"]

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current = read_lease(self.out)
                if current is not None and current.get("token") != self.token:
                    self.log(f"the lease on {self.out.uri} was taken over by {current.get('holder')} "
                             f"(host {current.get('host')}, pid {current.get('pid')}); this run no longer holds it")
                    return
                self.info["heartbeat"] = _now()
                self.out.write_json(LEASE, self.info)
            except Exception:  # noqa: BLE001 - a missed beat is retried; STALE_S allows several
                continue

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            current = read_lease(self.out)
            if current is not None and current.get("token") == self.token:
                self.out.fs.rm(self.out.path(LEASE))
        except Exception:  # noqa: BLE001 - gone already, or the output is unreachable: the lease goes stale
            pass
        try:
            atexit.unregister(self.release)
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _create_exclusive(out: Output, data: bytes) -> bool:
    """Local filesystems: write a temporary file and hard-link it to the lease name; False if a lease exists."""
    out.fs.makedirs(out.root, exist_ok=True)
    temporary = out.path(f".{LEASE}.{uuid.uuid4().hex[:12]}.tmp")
    with open(temporary, "wb") as f:
        f.write(data)
    try:
        os.link(temporary, out.path(LEASE))
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)


def acquire(uri: str, holder: str = "a pws-batch run", log: Callable[[str], None] = print) -> Lease:
    """Take the lease on OUT, or raise LeaseError naming the live holder. A dead holder's lease is taken over."""
    out = Output(uri)
    now = _now()
    info = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid(), "user": _user(),
            "token": uuid.uuid4().hex, "started_at": _iso(now), "heartbeat": now}
    data = json.dumps(info, indent=2).encode()
    local = type(out.fs).__name__ == "LocalFileSystem"
    for _ in range(3):
        current = read_lease(out)
        if current is not None:
            alive, who = holder_state(current)
            if alive:
                raise LeaseError(_refusal(uri, who))
            log(f"taking over the lease on {uri} from {who}")
            try:
                out.fs.rm(out.path(LEASE))
            except FileNotFoundError:
                pass
        elif out.exists(LEASE):  # there, but cut off mid-write: a writer died; remove it
            out.fs.rm(out.path(LEASE))
        if local:
            if _create_exclusive(out, data):
                return Lease(out, info, log)
            continue  # another run made its lease in between: look at it again
        out.write_json(LEASE, info)
        time.sleep(SETTLE_S)
        current = read_lease(out)
        if current is not None and current.get("token") == info["token"]:
            return Lease(out, info, log)
    current = read_lease(out)
    who = holder_state(current)[1] if current else "another run"
    raise LeaseError(_refusal(uri, who))


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return str(os.getuid()) if hasattr(os, "getuid") else "?"
