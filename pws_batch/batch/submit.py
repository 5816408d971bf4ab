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
        raise SubmitError(f"the Prefect API at {url} is unreachable ({type(exc).__name__}: {exc}); start it "
                          f"(`prefect server start`) or fix PREFECT_API_URL") from exc
    if response.status_code != 200:
        raise SubmitError(f"the Prefect API at {url} answered {response.status_code} to /health; is it a Prefect "
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
                          f"with `prefect --no-prompt deploy --prefect-file cluster/prefect.yaml --all` "
                          f"(see cluster/README.md)") from None


def submit(parameters: dict[str, Any], deployment: str = DEFAULT_DEPLOYMENT) -> tuple[str, str]:
    """Create a flow run of `deployment` with `parameters`; returns (flow run id, its URL in the Prefect UI)."""
    check_api()
    with _client() as client:
        dep = read_deployment(client, deployment)
        flow_run = client.create_flow_run_from_deployment(dep.id, parameters=parameters,
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
    with _client() as client:
        try:
            flow_run = client.read_flow_run(run_id)
        except ObjectNotFound:
            raise SubmitError(f"no flow run {flow_run_id} at {api_url()}") from None
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        progress = progress_of(client, run_id)
    by_state = Counter(t.state_type.value if t.state_type else "PENDING" for t in tasks)
    return {"id": flow_run_id, "name": flow_run.name, "state": flow_run.state_type.value if flow_run.state_type else "?",
            "state_message": flow_run.state.message if flow_run.state else None, "tasks": dict(by_state),
            "progress": progress, "out": flow_run.parameters.get("out"), "manifest": flow_run.parameters.get("manifest"),
            "url": ui_url(flow_run_id)}


def dataset_counts(out: str | None) -> dict[str, Any] | None:
    """The dataset's run.json counts, when its location is readable from here."""
    if not out:
        return None
    try:
        from pws_batch.batch.dataset import Output

        o = Output(out)
        return o.read_json("run.json").get("counts") if o.exists("run.json") else None
    except Exception:  # noqa: BLE001 - an s3 URI without credentials here, etc.
        return None


def format_status(info: dict[str, Any]) -> str:
    counts = dataset_counts(info["out"])
    tasks = ", ".join(f"{n} {s.lower()}" for s, n in sorted(info["tasks"].items())) or "none yet"
    lines = [f"flow run {info['id']} ({info['name']}): {info['state']}"
             + (f" - {info['state_message']}" if info["state_message"] and info["state"] != "COMPLETED" else ""),
             f"  shard tasks  {tasks}",
             f"  progress     {info['progress']:.0f}% of pairs" if info["progress"] is not None else "  progress     n/a",
             f"  manifest     {info['manifest']}",
             f"  dataset      {info['out']}"]
    if counts:
        lines.append(f"  pairs        {counts.get('pairs_done', 0)} kept, {counts.get('pairs_failed', 0)} failed, "
                     f"{counts.get('rejected', 0)} rejected")
    lines.append(f"  UI           {info['url']}")
    return "\n".join(lines)


def wait(flow_run_id: str, poll_s: float = 2.0, timeout_s: float | None = None,
         say: Callable[[str], None] = print) -> dict[str, Any]:
    """Follow a flow run to its end, saying each state change and progress step."""
    start, last = time.time(), None
    while True:
        info = describe(flow_run_id)
        seen = (info["state"], info["progress"])
        if seen != last:
            progress = f", {info['progress']:.0f}% of pairs" if info["progress"] is not None else ""
            say(f"{info['name']}: {info['state'].lower()}{progress}")
            last = seen
        if info["state"] in FINAL:
            return info
        if timeout_s is not None and time.time() - start > timeout_s:
            raise SubmitError(f"flow run {flow_run_id} still {info['state']} after {timeout_s:.0f} s")
        time.sleep(poll_s)
