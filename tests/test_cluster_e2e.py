"""The users' day on one machine, with real servers on loopback: a Prefect server, a Ray head started with
`ray start --head` (token auth on), a process work pool and worker, the deployment from cluster/prefect.yaml;
`pws-batch submit --wait` runs the example-style manifest with the tiny models on that Ray cluster.

Also: submitting to an unreachable API or a missing deployment fails fast and clearly, and a manifest with only
bad rows is refused before anything is submitted. Every process started here is stopped by PID (its session).
"""

from __future__ import annotations

import json
import glob
import os
import secrets
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest

from servers import REPO, VENV_BIN, api, base_env, free_port, kill_session, prefect_server

pytestmark = pytest.mark.slow


def run_cli(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pws_batch.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_models):
    """Prefect server + Ray head + deployment + process worker; yields (api_url, env for clients, logs dir, Ray
    address, Ray temp dir)."""
    home = str(tmp_path_factory.mktemp("prefect-cluster"))
    procs: list[subprocess.Popen] = []
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # The cluster's own token, as an operator makes one: `ray start --head` with token auth refuses to start
    # without a token, and the tests must not depend on (nor write) ~/.ray/auth_token.
    token = os.path.join(home, "ray_auth_token")
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(token, 0o600)
    with prefect_server(home) as url:
        env = base_env(home, PREFECT_API_URL=url, PWS_BATCH_REPO=REPO, RAY_AUTH_TOKEN_PATH=token)
        try:
            port, client_port = free_port(), free_port()
            # Each Ray Client connection starts a server process on the head; on a busy 2-core machine its
            # channel can take longer than Ray's 30 s default to come up, which fails the flow's ray.init.
            ray_env = dict(env, RAY_AUTH_MODE="token", RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S="180",
                           RAY_worker_niceness="0")  # as cluster/README.md starts it
            ray_log = open(os.path.join(home, "ray.log"), "wb")
            head = subprocess.Popen(
                [os.path.join(VENV_BIN, "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                 "--ray-client-server-port", str(client_port), "--num-cpus", "2", "--num-gpus", "0",
                 "--temp-dir", ray_tmp, "--include-dashboard=false",
                 "--disable-usage-stats", "--block"],
                env=ray_env, stdout=ray_log, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(head)
            address = f"127.0.0.1:{port}"
            deadline = time.time() + 90
            while not any(f.startswith("session_") for f in os.listdir(ray_tmp)) or not _ray_up(address, env):
                assert head.poll() is None, open(os.path.join(home, "ray.log")).read()[-3000:]
                assert time.time() < deadline, "ray start --head did not come up in 90 s"
                time.sleep(1)

            prefect = os.path.join(VENV_BIN, "prefect")
            out = subprocess.run([prefect, "work-pool", "create", "pws-local", "--type", "process"], env=env,
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stdout + out.stderr
            out = subprocess.run([prefect, "--no-prompt", "deploy", "--prefect-file", "cluster/prefect.yaml",
                                  "--name", "local"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stdout + out.stderr

            worker_log = open(os.path.join(home, "worker.log"), "wb")
            # As the k8s deployment does: the flow is not on a Ray node and joins through Ray Client (ray://);
            # RAY_AUTH_MODE is left for pws-batch to set, as it must be before ray is imported.
            worker = subprocess.Popen([prefect, "worker", "start", "--pool", "pws-local", "--type", "process"],
                                      env=dict(env, RAY_ADDRESS=f"ray://127.0.0.1:{client_port}"), cwd=REPO,
                                      stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(worker)
            yield url, env, home, address, ray_tmp
        finally:
            for proc in reversed(procs):
                kill_session(proc)


def _ray_up(address: str, env: dict) -> bool:
    probe = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{address}'); "
                                                  "print(ray.cluster_resources().get('CPU'))"],
                           env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=60)
    return probe.returncode == 0 and probe.stdout.strip().endswith("2.0")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("submit-manifest")
    rows = [dict(pair_id=f"p{i}", image_prompt=f"picture {i}", audio_prompt=f"sound {i}") for i in range(3)]
    rows.append(dict(pair_id="bad", image_prompt="", audio_prompt="x"))
    path = folder / "pairs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def _logs(home: str, ray_tmp: str) -> str:
    """The process worker's log and Ray Client's server logs (the proxy's, each client's server's): what a failed
    submission needs to be understood."""
    paths = [os.path.join(home, "worker.log")]
    paths += sorted(glob.glob(os.path.join(ray_tmp, "session_latest", "logs", "ray_client_server*")))
    text = []
    for path in paths:
        with open(path, errors="replace") as f:
            text.append(f"--- {os.path.basename(path)}\n{f.read()[-4000:]}")
    return "\n".join(text)


def test_submit_wait_runs_the_deployment_on_the_ray_cluster(cluster, manifest, tmp_path):
    url, env, home, address, ray_tmp = cluster
    out = str(tmp_path / "dataset")
    proc = run_cli(["submit", manifest, "--out", out, "--models", "tiny", "--candidates", "2", "--steps", "3",
                    "--shard-size", "2", "--wait"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr + _logs(home, ray_tmp)
    lines = proc.stdout.splitlines()
    run_id = lines[0].rsplit(" ", 1)[-1]
    assert lines[0].startswith("submitted 3 pairs (1 row rejected) to generate-dataset/local: flow run ")
    assert lines[1] == f"watch it at {url.removesuffix('/api')}/runs/flow-run/{run_id}"
    assert "COMPLETED" in proc.stdout and "rejected row 3" in proc.stderr

    flow_run = api(url, "/flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]
    assert flow_run["state_type"] == "COMPLETED" and flow_run["name"].startswith("pairs-")
    # one name from submission to the end (the flow named itself again as it started: the start's time)
    followed = {line.split(": ", 1)[0] for line in proc.stderr.splitlines() if line.startswith("pairs-")}
    assert followed == {flow_run["name"]}, (followed, flow_run["name"])
    assert flow_run["parameters"]["config"]["engine"]["models"] == "tiny" and flow_run["parameters"]["out"] == out
    tasks = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    assert sorted(t["name"] for t in tasks) == ["shard-00000", "shard-00001"]
    assert {t["state_type"] for t in tasks} == {"COMPLETED"}
    artifacts = api(url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    assert {a["type"] for a in artifacts} >= {"progress", "table", "markdown"}
    logs = "\n".join(e["message"] for e in api(url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}}))
    ray_lines = [line for line in logs.splitlines() if line.startswith("Ray:")]
    # Joined the cluster, not a local Ray. A busy head can lose Ray Client's server for a connection before it serves
    # ("Initialization failure from server"): the run then says so and joins again (engine.CLIENT_ATTEMPTS).
    # through Ray Client, as the worker's RAY_ADDRESS says, to the head started above
    joined = [line for line in ray_lines if "joined the Ray cluster at ray://127.0.0.1:" in line
              and f"(its GCS at {address})" in line]
    retried = [line for line in ray_lines if line.startswith("Ray: joining ray://") and "trying again in" in line]
    assert len(joined) == 1 and len(joined) + len(retried) == len(ray_lines), ray_lines
    assert "generator on " in logs and "ranker on " in logs and "GPUs none" in logs

    run = json.load(open(os.path.join(out, "run.json")))
    assert run["status"] == "complete" and run["counts"]["pairs_done"] == 3 and run["counts"]["rejected"] == 1
    assert sorted(os.listdir(os.path.join(out, "_shards"))) == ["00000.json", "00001.json"]
    assert len(pd.read_parquet(os.path.join(out, "data"))) == 3

    status = run_cli(["status", run_id], env)
    assert status.returncode == 0, status.stderr
    assert "COMPLETED" in status.stdout and "2 completed" in status.stdout and out in status.stdout
    assert "3 kept, 0 failed, 1 rejected" in status.stdout and "100% of pairs" in status.stdout


def test_submit_to_a_missing_deployment_fails_fast(cluster, manifest, tmp_path):
    url, env, *_ = cluster
    proc = run_cli(["submit", manifest, "--out", str(tmp_path / "o"), "--models", "tiny", "--deployment",
                    "generate-dataset/nope"], env)
    assert proc.returncode == 2
    assert "no deployment 'generate-dataset/nope'" in proc.stderr and "generate-dataset/local" in proc.stderr


def test_submit_to_an_unreachable_api_fails_fast(manifest, tmp_path):
    env = base_env(str(tmp_path), PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    started = time.time()
    proc = run_cli(["submit", manifest, "--out", str(tmp_path / "o"), "--models", "tiny"], env)
    assert proc.returncode == 2 and "is unreachable" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert time.time() - started < 60  # fails fast: no retries against a dead API (generous bound: slow CI)


def test_a_manifest_with_only_bad_rows_is_refused_before_submission(cluster, tmp_path):
    url, env, *_ = cluster
    bad = tmp_path / "bad.csv"
    pd.DataFrame([dict(image_prompt="", audio_prompt="x"), dict(image_prompt="y", audio_prompt="z", strength=5,
                                                             guide_audio="nope.wav")]).to_csv(bad, index=False)
    before = len(api(url, "/flow_runs/filter", {}))
    proc = run_cli(["submit", str(bad), "--out", str(tmp_path / "o"), "--models", "tiny"], env)
    assert proc.returncode == 2 and "has no good row (2 rows, all rejected)" in proc.stderr
    assert len(api(url, "/flow_runs/filter", {})) == before  # nothing was submitted


def test_submit_refuses_an_out_that_run_would_refuse_before_submitting(cluster, manifest, tmp_path):
    """What this machine can see of --out is checked before a flow run is made (it was found only inside the flow,
    after queueing and a worker's start-up, and memory:// 'completed' with the dataset gone)."""
    url, env, *_ = cluster
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    changed = tmp_path / "made-with-other-settings"
    changed.mkdir()
    (changed / "run.json").write_text(json.dumps({"status": "complete", "fingerprint": {"manifest_sha256": "x"}}))
    before = len(api(url, "/flow_runs/filter", {}))
    for out, words in (("memory://x", "memory of the flow's process"), (str(a_file), "is a file"),
                       (str(changed), "other settings")):
        proc = run_cli(["submit", manifest, "--out", out, "--models", "tiny"], env)
        assert proc.returncode == 2 and words in proc.stderr, (out, proc.stdout + proc.stderr)
        assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr  # a rejected row's line, the refusal
    assert len(api(url, "/flow_runs/filter", {})) == before  # nothing was submitted


def test_submit_warns_of_another_run_writing_to_the_same_out(cluster, manifest, tmp_path):
    """Two submissions into one --out: the second to start is refused the output (its lease); the user is told at
    submission, naming the other run and how to cancel it."""
    import datetime as dt

    import httpx

    url, env, *_ = cluster
    out = str(tmp_path / "shared")
    dep = httpx.get(f"{url}/deployments/name/generate-dataset/local", timeout=30).json()
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).isoformat()
    other = httpx.post(f"{url}/deployments/{dep['id']}/create_flow_run", timeout=30, json={
        "name": "someone-elses-run", "parameters": {"manifest": manifest, "out": out},
        "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": later}}}).json()
    proc = run_cli(["submit", manifest, "--out", out, "--models", "tiny", "--candidates", "2", "--steps", "2"], env)
    mine = None
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        warning = next(line for line in proc.stderr.splitlines() if line.startswith("warning: flow run"))
        assert "someone-elses-run" in warning and other["id"] in warning and f"also writes to {out}" in warning
        assert f"prefect flow-run cancel {other['id']}" in warning
        mine = proc.stdout.splitlines()[0].rsplit(" ", 1)[-1]
        named = api(url, "/flow_runs/filter", {"flow_runs": {"id": {"any_": [mine]}}})[0]["name"]
        assert named.startswith("pairs-"), named  # the manifest's name from the start, not Prefect's random one
    finally:
        for run_id in [other["id"]] + ([mine] if mine else []):
            httpx.post(f"{url}/flow_runs/{run_id}/set_state", timeout=30,
                       json={"state": {"type": "CANCELLED"}, "force": True})
