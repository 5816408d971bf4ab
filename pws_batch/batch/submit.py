"""Submitting a manifest to a Prefect deployment of `generate-dataset`, and following flow runs.

Talks to the Prefect API named by PREFECT_API_URL. Everything that can be refused is refused here, before a
flow run exists: an unreachable API, a missing deployment, a manifest with no good row.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

DEFAULT_DEPLOYMENT = "generate-dataset/local"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class SubmitError(RuntimeError):
    """Printed as one line; nothing was submitted."""


class ApiUnreachable(SubmitError):
    """The Prefect API does not answer (or not as a Prefect API)."""


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise SubmitError("PREFECT_API_URL is not set: point it at the team's Prefect server, e.g. "
                          "`export PREFECT_API_URL=http://prefect.example.org:4200/api`")
    return url.rstrip("/")


def ui_url(flow_run_id: str) -> str:
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value() or api_url().removesuffix("/api")
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}"


def check_api(timeout: float = 5.0) -> str:
    """Fail fast, with the URL and the reason, when the Prefect API does not answer."""
    import httpx

    url = api_url()
    try:
        response = httpx.get(f"{url}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        raise ApiUnreachable(f"the Prefect API at {url} is unreachable ({type(exc).__name__}: {exc}); start it "
                             f"(`prefect server start`) or fix PREFECT_API_URL") from exc
    if response.status_code != 200:
        raise ApiUnreachable(f"the Prefect API at {url} answered {response.status_code} to /health; is it a Prefect "
                             f"server's /api URL?")
    return url


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def read_deployment(client, name: str):
    from prefect.exceptions import ObjectNotFound

    if "/" not in name:
        raise SubmitError(f"--deployment {name!r}: give FLOW/DEPLOYMENT, e.g. {DEFAULT_DEPLOYMENT}")
    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        known = sorted(f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments())
        raise SubmitError(f"no deployment {name!r} at {api_url()} (known: {', '.join(known) or 'none'}); create it "
                          f"from the repository's root: `PWS_BATCH_REPO=$PWD prefect --no-prompt deploy --prefect-file "
                          f"cluster/prefect.yaml --name local` on one host, `--name k8s` for the cluster's "
                          f"Kubernetes work pool (cluster/README.md)") from None


def check_deployment(deployment: str) -> None:
    """SubmitError (one line, with the known deployments and how to create one) when `deployment` does not exist:
    asked before the manifest is read, which can take long for a big one."""
    with _client() as client:
        read_deployment(client, deployment)


def runs_writing_to(deployment: str, out: str) -> list[tuple[str, str, str]]:
    """The flow runs of `deployment` not yet ended whose --out is `out`: (name, id, state) each. Two such runs
    share one output: the second to start is refused it (its lease)."""
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    with _client() as client:
        dep = read_deployment(client, deployment)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED,
                      StateType.CANCELLING]))), limit=200)  # the API serves at most 200 a call
    same = out.rstrip("/")
    return [(r.name, str(r.id), r.state_name or "?") for r in runs
            if str((r.parameters or {}).get("out") or "").rstrip("/") == same]


def submit(parameters: dict[str, Any], deployment: str = DEFAULT_DEPLOYMENT,
           name: str | None = None) -> tuple[str, str]:
    """Create a flow run of `deployment` with `parameters` (named `name`: else Prefect's random name until the flow
    starts and names itself); returns (flow run id, its URL in the Prefect UI)."""
    check_api()
    with _client() as client:
        dep = read_deployment(client, deployment)
        flow_run = client.create_flow_run_from_deployment(dep.id, parameters=parameters, name=name,
                                                          tags=["pws-batch", "submitted"])
    return str(flow_run.id), ui_url(str(flow_run.id))


def progress_of(client, flow_run_id) -> float | None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
    return float(artifacts[0].data) if artifacts else None


def describe(flow_run_id: str) -> dict[str, Any]:
    """State, shard task runs, progress and dataset location of one flow run."""
    from uuid import UUID

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import ObjectNotFound

    check_api()
    try:
        run_id = UUID(flow_run_id)
    except ValueError:
        raise SubmitError(f"{flow_run_id!r} is not a flow run id (a UUID printed by `pws-batch submit`)") from None
    import httpx

    try:
        with _client() as client:
            try:
                flow_run = client.read_flow_run(run_id)
            except ObjectNotFound:
                raise SubmitError(f"no flow run {flow_run_id} at {api_url()}") from None
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            progress = progress_of(client, run_id)
    except httpx.HTTPError as exc:  # it stopped answering after the health check
        raise ApiUnreachable(f"the Prefect API at {api_url()} is unreachable ({type(exc).__name__}: {exc})") from exc
    by_state = Counter(t.state_type.value if t.state_type else "PENDING" for t in tasks)
    return {"id": flow_run_id, "name": flow_run.name, "state": flow_run.state_type.value if flow_run.state_type else "?",
            "state_name": flow_run.state_name, "work_pool": flow_run.work_pool_name,
            "state_message": flow_run.state.message if flow_run.state else None, "tasks": dict(by_state),
            "progress": progress, "out": flow_run.parameters.get("out"), "manifest": flow_run.parameters.get("manifest"),
            "url": ui_url(flow_run_id)}


def dataset_run_json(out: str | None) -> dict[str, Any] | None:
    """The dataset's run.json, when its location is readable from here."""
    if not out:
        return None
    try:
        from pws_batch.batch.dataset import Output

        o = Output(out)
        return o.read_json("run.json") if o.exists("run.json") else None
    except Exception:  # noqa: BLE001 - an s3 URI without credentials here, etc.
        return None


def state_label(info: dict[str, Any]) -> str:
    """The flow run's state type, with Prefect's name for it when that says more: "SCHEDULED (Late)"."""
    named = info.get("state_name")
    return info["state"] + (f" ({named})" if named and named.upper() != info["state"] else "")


def format_status(info: dict[str, Any]) -> str:
    run_json = dataset_run_json(info["out"]) or {}
    counts = run_json.get("counts")
    by = run_json.get("flow_run_id")
    final = info["state"] in FINAL
    # a run that ended (crashed, say) before its tasks did: their last states are not what they are doing now
    tasks = ", ".join(f"{n} {s.lower() if not final or s in FINAL else 'unfinished'}"
                      for s, n in sorted(info["tasks"].items())) or ("none" if final else "none yet")
    lines = [f"flow run {info['id']} ({info['name']}): {state_label(info)}"
             + (f" - {info['state_message']}" if info["state_message"] and info["state"] != "COMPLETED" else ""),
             f"  shard tasks  {tasks}",
             f"  progress     {info['progress']:.0f}% of pairs" if info["progress"] is not None else "  progress     n/a",
             f"  manifest     {info['manifest']}",
             f"  dataset      {info['out']}"]
    if counts and by and by != info["id"]:  # e.g. this run was refused the output another run holds
        lines.append(f"  pairs        (the dataset's run.json is of flow run {by}, not this one)")
    elif counts:
        lines.append(f"  pairs        {counts.get('pairs_done', 0)} kept, {counts.get('pairs_failed', 0)} failed, "
                     f"{counts.get('rejected', 0)} rejected")
    lines.append(f"  UI           {info['url']}")
    return "\n".join(lines)


class LostTrack(SubmitError):
    """`--wait` stopped following a flow run that may still be running (the API stopped answering, or a time limit):
    the run itself goes on."""


NOT_STARTED = {"SCHEDULED", "PENDING"}


def wait(flow_run_id: str, poll_s: float = 2.0, timeout_s: float | None = None,
         say: Callable[[str], None] = print, api_grace_s: float = 120.0, unstarted_hint_s: float = 60.0,
         describe: Callable[[str], dict[str, Any]] = describe) -> dict[str, Any]:
    """Follow a flow run to its end, saying each state change and progress step.

    The API not answering is waited out for `api_grace_s` (a restart, a network blip: the run goes on without it)
    before LostTrack; a run no worker has started after `unstarted_hint_s` gets one line on what to check."""
    start, last, hinted, lost_since = time.time(), None, False, None
    while True:
        try:
            info = describe(flow_run_id)
        except ApiUnreachable as exc:
            info = None
            if lost_since is None:
                lost_since = time.time()
                say(f"the Prefect API does not answer ({exc}); still trying for {api_grace_s:.0f} s (the run goes "
                    f"on without it)")
            elif time.time() - lost_since > api_grace_s:
                raise LostTrack(f"the Prefect API has not answered for {api_grace_s:.0f} s; flow run {flow_run_id} "
                                f"may still be running: `pws-batch status {flow_run_id}` once the API is back") from exc
        if info is not None:
            if lost_since is not None:
                say("the Prefect API answers again")
                lost_since = None
            seen = (state_label(info), info["progress"])
            if seen != last:
                progress = f", {info['progress']:.0f}% of pairs" if info["progress"] is not None else ""
                say(f"{info['name']}: {seen[0].lower()}{progress}")
                last = seen
            if info["state"] in FINAL:
                return info
            if info["state"] in NOT_STARTED and not hinted and time.time() - start > unstarted_hint_s:
                pool = info.get("work_pool") or "its work pool"
                say(f"no worker has started {info['name']} after {unstarted_hint_s:.0f} s: is a worker polling "
                    f"{pool} (`prefect worker start --pool {pool}`), and is the pool not paused (`prefect work-pool "
                    f"inspect {pool}`)? The run starts when one does")
                hinted = True
        if timeout_s is not None and time.time() - start > timeout_s:
            if info is None:
                raise LostTrack(f"flow run {flow_run_id}: --wait-timeout ({timeout_s:.0f} s) passed while the "
                                f"Prefect API did not answer; it may still be running: `pws-batch status "
                                f"{flow_run_id}`")
            raise LostTrack(f"flow run {flow_run_id} still {info['state']} after {timeout_s:.0f} s; it goes on: "
                            f"`pws-batch status {flow_run_id}`")
        time.sleep(poll_s)
