"""`pws-batch submit --wait`'s following of a flow run (pws_batch.batch.submit.wait): what it says and when it stops
following, with the flow run's descriptions scripted (the real API path runs in tests/test_cluster_e2e.py)."""

from __future__ import annotations

import pytest

from pws_batch.batch.submit import ApiUnreachable, LostTrack, SubmitError, wait


def scripted(*steps):
    """describe() that answers each step in turn (an exception is raised), the last one for ever."""
    steps, seen = list(steps), []

    def describe(run_id: str) -> dict:
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        seen.append(step)
        if isinstance(step, Exception):
            raise step
        return {"id": run_id, "name": "pairs-1", "state": step[0], "state_name": step[1], "progress": step[2],
                "work_pool": "pws-local"}
    return describe


UNREACHABLE = ApiUnreachable("the Prefect API at http://127.0.0.1:1/api is unreachable (ConnectError: refused)")


def test_an_api_that_stops_answering_for_a_while_is_waited_out():
    said = []
    info = wait("r", poll_s=0.001, say=said.append, api_grace_s=5, describe=scripted(
        ("RUNNING", "Running", 50.0), UNREACHABLE, UNREACHABLE, ("COMPLETED", "Completed", 100.0)))
    assert info["state"] == "COMPLETED"
    assert said[0] == "pairs-1: running, 50% of pairs" and said[-1] == "pairs-1: completed, 100% of pairs"
    assert sum("does not answer" in line for line in said) == 1 and "the Prefect API answers again" in said


def test_an_api_gone_for_good_stops_the_following_not_the_run():
    with pytest.raises(LostTrack, match="may still be running: `pws-batch status r`"):
        wait("r", poll_s=0.01, say=lambda line: None, api_grace_s=0.05,
             describe=scripted(("RUNNING", "Running", None), UNREACHABLE))


def test_a_run_no_worker_starts_gets_a_hint_naming_the_pool_and_a_time_limit_ends_the_wait():
    said = []
    with pytest.raises(LostTrack, match="still SCHEDULED after"):
        wait("r", poll_s=0.01, say=said.append, unstarted_hint_s=0.03, timeout_s=0.1,
             describe=scripted(("SCHEDULED", "Late", None)))
    assert said[0] == "pairs-1: scheduled (late)"
    hints = [line for line in said if "no worker has started" in line]
    assert len(hints) == 1 and "prefect worker start --pool pws-local" in hints[0]


def test_other_errors_are_not_waited_out():
    with pytest.raises(SubmitError, match="no flow run"):
        wait("r", poll_s=0.001, say=lambda line: None, describe=scripted(SubmitError("no flow run r at ...")))


def test_status_says_what_the_dataset_and_the_tasks_are_of_this_run(tmp_path):
    """A run refused the output another run holds showed that run's counts; a crashed run's tasks were 'running'."""
    import json

    from pws_batch.batch.submit import format_status

    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"flow_run_id": "other", "counts": {"pairs_done": 3}}))
    info = {"id": "this", "name": "pairs-1", "state": "CRASHED", "state_message": "killed", "progress": 25.0,
            "tasks": {"COMPLETED": 1, "RUNNING": 2}, "out": str(out), "manifest": "m.csv", "url": "http://ui/r"}
    text = format_status(info)
    assert "1 completed, 2 unfinished" in text and "run.json is of flow run other" in text and "3 kept" not in text
    (out / "run.json").write_text(json.dumps({"flow_run_id": "this", "counts": {"pairs_done": 3}}))
    assert format_status({**info, "state": "SCHEDULED", "state_name": "Late"}).startswith(
        "flow run this (pairs-1): SCHEDULED (Late)")
    text = format_status({**info, "state": "RUNNING", "tasks": {}})
    assert "none yet" in text and "3 kept, 0 failed, 0 rejected" in text
    assert "shard tasks  none\n" in format_status({**info, "state": "COMPLETED", "tasks": {}})


def test_a_wait_timeout_holds_while_the_api_is_silent_too():
    """--wait-timeout 30 during an outage waited the API's whole 2-minute grace."""
    import time

    t0 = time.monotonic()
    with pytest.raises(LostTrack, match="--wait-timeout"):
        wait("r", poll_s=0.01, say=lambda line: None, timeout_s=0.1, api_grace_s=30,
             describe=scripted(("RUNNING", "Running", None), UNREACHABLE))
    assert time.monotonic() - t0 < 10


def test_push_failures_say_what_failed():
    """An HTTP error of the Hub is an OSError too: it was reported as 'cannot reach the Hub'."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    from pws_batch.batch.export import _hub_failure

    def http_error(status: int) -> Exception:
        request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
        return HfHubHTTPError(f"{status} error", response=httpx.Response(status, request=request))

    assert "answered 500" in str(_hub_failure(http_error(500)))
    assert "hf auth login" in str(_hub_failure(http_error(401)))
    assert "cannot reach" in str(_hub_failure(httpx.ConnectError("refused")))
    local = PermissionError(13, "Permission denied", "data/part-00000.parquet")
    assert _hub_failure(local) is local
