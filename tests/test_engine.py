"""The engine's dispatch (pws_batch.batch.engine) without models: a real local Ray, stand-in actors.

The stand-ins (pws_batch.batch.standins) have the real generator's and ranker's interface (`generate_batch`,
`rank_batch`, `info`) and run inside the real Worker actor, so what is tested is the engine's own work: creating
workers, lending one per shard, queuing a shard's micro-batches, keeping request order and passing failures
through.
"""

from __future__ import annotations

import os
import threading
import time
import pytest

from pws_batch.batch import engine
from pws_batch.batch.config import RunConfig
from pws_batch.batch.pair import PairRequest
from pws_batch.batch.standins import FAIL_MARK, StandInGenerator, StandInRanker
from pws_batch.core.allocator import CPU_MALLOC_ENV
from pws_batch.core.params import GenerationParams


def request(i: int, pair_id: str | None = None) -> PairRequest:
    return PairRequest(i, pair_id or f"p{i}", GenerationParams(f"picture {i}", f"sound {i}", num_candidates=3,
                                                               seed=10 * i), keep=1)


SERVER_FAILURE = ("Initialization failure from server:\nTraceback (most recent call last):\n  File \"proxier.py\", "
                  "line 772, in Datapath\nRuntimeError: Starting Ray client server failed. See "
                  "ray_client_server_23000.err for detailed logs.")


@pytest.mark.parametrize("failures, joined", [(0, True), (2, True), (3, False)])
def test_joining_through_ray_client_is_tried_again_when_its_server_fails_to_start(monkeypatch, failures, joined):
    """The error Ray Client raises when the head's per-connection server died before serving (seen in CI) is
    transient: the join is tried CLIENT_ATTEMPTS times, each retry said, and the last error goes on. Unit test
    of the retry alone: `ray.init` raises Ray's own exception with its own text for the first `failures` calls."""
    import ray

    calls, said = [], []

    def init(address=None, **kwargs):
        calls.append(address)
        if len(calls) <= failures:
            raise ConnectionAbortedError(SERVER_FAILURE)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(engine, "check_ray_address", lambda address: None)  # no cluster listens: ray.init is faked
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    join = lambda: engine.connect_ray("ray://127.0.0.1:10001", log=said.append, pause_s=0)  # noqa: E731
    if joined:
        assert join() is False  # joined, not started here
    else:
        with pytest.raises(ConnectionAbortedError, match="Starting Ray client server failed"):
            join()
    assert calls == ["ray://127.0.0.1:10001"] * min(failures + 1, engine.CLIENT_ATTEMPTS)
    assert len(said) == min(failures, engine.CLIENT_ATTEMPTS - 1)
    assert all("Initialization failure from server" in line and "ray://127.0.0.1:10001" in line for line in said)


def test_a_cluster_address_is_probed_before_ray_init_would_retry_it_for_ever():
    import socket

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", None, "auto", "local", "ray://head"):
            engine.check_ray_address(address)  # something listens, or Ray's to resolve
    with pytest.raises(engine.RayUnreachable, match=f"cannot reach the Ray cluster at ray://127.0.0.1:{port} "
                                                    r"\(Connection refused\)"):
        engine.check_ray_address(f"ray://127.0.0.1:{port}")


def test_joining_a_cluster_by_gcs_address_is_not_tried_again(monkeypatch):
    """Only Ray Client's per-connection server is worth a second try; a plain address fails at once."""
    import ray

    calls = []

    def init(address=None, **kwargs):
        calls.append(address)
        raise ConnectionAbortedError("refused")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(engine, "check_ray_address", lambda address: None)  # no cluster listens: ray.init is faked
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ConnectionAbortedError):
        engine.connect_ray("127.0.0.1:6379", log=print, pause_s=0)
    assert calls == ["127.0.0.1:6379"]


@pytest.mark.parametrize("address", [None, "local"])
def test_a_local_ray_is_started_even_where_a_ray_start_left_its_address(address):
    """`ray start` writes its address to Ray's temp folder, and a bare ray.init() joins whatever is there, even a
    cluster long gone. A run without an address (or with Ray's own "local") starts a Ray of its own, with its
    workers at the default priority."""
    import shutil
    import subprocess
    import sys
    import tempfile

    temp = tempfile.mkdtemp(prefix="pwsr", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(temp, "ray"))
        with open(os.path.join(temp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:1")  # a cluster that is not there
        code = ("import os, sys; from pws_batch.batch import engine\n"
                "started = engine.connect_ray(sys.argv[1] or None, num_cpus=1)\n"
                "import ray\n"
                "print('RESULT', started, ray.get(ray.remote(lambda: os.nice(0)).remote()), flush=True)\n"
                "ray.shutdown()")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        done = subprocess.run([sys.executable, "-c", code, address or ""], env=dict(env, RAY_TMPDIR=temp),
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"RESULT True {os.nice(0)}" in done.stdout
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_actor_pool_lends_each_worker_to_one_shard_at_a_time():
    pool = engine.ActorPool(["w0", "w1"])
    in_use: list[int] = []
    peak, lock, seen = [0], threading.Lock(), []

    def shard():
        with pool.borrow() as (i, worker):
            with lock:
                assert i not in in_use and worker == f"w{i}"
                in_use.append(i)
                peak[0] = max(peak[0], len(in_use))
                seen.append(i)
            time.sleep(0.02)
            with lock:
                in_use.remove(i)

    threads = [threading.Thread(target=shard) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and peak[0] == 2 and set(seen) == {0, 1}


@pytest.mark.parametrize("stops", [True, False])
def test_a_shard_whose_run_stops_under_it_is_not_retried_and_a_failed_shard_is(monkeypatch, stops):
    """Ctrl-C: the flow unregisters its engine and stops Ray while a shard task still runs; that task's failure is
    RunStopped, which Prefect's retry condition declines (no "Retry 1/2" after the run has ended). A shard that
    fails while its run goes on is retried as before."""
    import logging
    from types import SimpleNamespace

    from prefect.states import Failed

    import flows.generate_dataset as flow_module

    key, shard = f"run-under-test-{stops}", SimpleNamespace(name="00000")

    def process_shard(*args, **kwargs):
        if stops:
            engine.unregister_pool(key)  # what the flow's `finally` does on Ctrl-C
        raise RuntimeError("the actor died")

    monkeypatch.setattr(flow_module.run, "process_shard", process_shard)
    monkeypatch.setattr(flow_module, "get_run_logger", lambda: logging.getLogger("test"))
    engine.register_pool(key, engine.ActorPool(["w0"]))
    try:
        with pytest.raises(RuntimeError) as raised:
            flow_module.generate_shard.fn(key, "/nowhere", {}, shard)
    finally:
        engine.unregister_pool(key)
    assert isinstance(raised.value, engine.RunStopped) is stops
    retry = flow_module.generate_shard.retry_condition_fn
    assert retry(flow_module.generate_shard, None, Failed(data=raised.value)) is (not stops)
    with pytest.raises(engine.RunStopped, match="the run stopped"):  # a shard started after the run ended
        flow_module.generate_shard.fn(key, "/nowhere", {}, shard)


def test_run_pairs_keeps_request_order_and_passes_failures_through(local_ray):
    config = RunConfig().replace(engine={"actors": 2, "device": "cpu"})
    pool = engine.start_actors(config, log=lambda line: None, generator_cls=StandInGenerator,
                               ranker_cls=StandInRanker)
    try:
        assert len(pool) == 2
        requests = [request(0), request(1), request(2, f"{FAIL_MARK}-2"), request(3), request(4)]
        results, where = engine.run_pairs(pool, requests)
        assert [r.pair_id for r in results] == ["p0", "p1", f"{FAIL_MARK}-2", "p3", "p4"]
        assert [r.ok for r in results] == [True, True, False, True, True]
        assert "asked to fail" in results[2].error and results[2].candidates == []
        good = results[0]
        assert not hasattr(good, "generated")  # the arrays stay in the worker
        assert [c.seed for c in good.candidates] == [0, 1, 2] and len(good.kept) == 1
        assert good.kept[0].image_png.startswith(b"\x89PNG") and good.kept[0].audio_wav.startswith(b"RIFF")
        assert all(c.image_png is None for c in good.candidates if not c.kept)
        assert good.unet_evals == 6 and good.ranker["pid"] != os.getpid()
        assert where["worker"] in (0, 1)
        infos = pool.infos()
        served = {i["role"]: i["pairs"] for i in infos if i["pairs"]}
        assert served == {"generator": 5, "ranker": 4}  # one worker served the whole shard
        assert len({(i["pid"], i["role"]) for i in infos}) == 4 and len({i["pid"] for i in infos}) == 2
        # CPU actors start with the malloc settings that keep freed memory (pws_batch.core.allocator)
        assert [i["malloc_env"] for i in infos if i["role"] == "generator"] == [CPU_MALLOC_ENV] * 2
        # ... and at the default priority, not Ray's nice 15 for workers (the local Ray's system config)
        assert [i["niceness"] for i in infos if i["role"] == "generator"] == [os.nice(0)] * 2
    finally:
        engine.stop_actors(pool)


def test_a_local_ray_keeps_its_workers_at_the_default_priority(local_ray):
    """Ray starts workers at nice 15; the local Ray a run starts (connect_ray) does not, so even a worker placed
    with no runtime_env of its own (a GPU worker) keeps the driver's priority."""
    import ray

    placement = engine.worker_placement(True, 2)
    assert "runtime_env" not in placement  # a GPU worker: Ray may hand it a worker it has ready
    # a CPU worker carries the priority in the runtime_env it has anyway, for clusters that set none
    assert engine.worker_placement(False, 2)["runtime_env"]["env_vars"]["RAY_worker_niceness"] == "0"
    options = {k: v for k, v in placement.items() if k != "num_gpus"}  # this Ray has no GPU

    @ray.remote
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.options(**options).remote()) == os.nice(0)


def test_two_shards_at_once_run_on_different_workers(local_ray):
    config = RunConfig().replace(engine={"actors": 2, "device": "cpu"})
    pool = engine.start_actors(config, log=lambda line: None, generator_cls=StandInGenerator,
                               ranker_cls=StandInRanker)
    try:
        outcomes = {}

        def shard(name, reqs):
            outcomes[name] = engine.run_pairs(pool, reqs)

        threads = [threading.Thread(target=shard, args=(n, [request(10 * n + i) for i in range(3)])) for n in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {outcomes[1][1]["worker"], outcomes[2][1]["worker"]} == {0, 1}
        assert [r.pair_id for r in outcomes[2][0]] == ["p20", "p21", "p22"]
    finally:
        engine.stop_actors(pool)


def test_too_many_actors_for_the_cluster_is_refused(local_ray):
    with pytest.raises(ValueError, match="--actors 5: the cluster has 2 CPU"):
        engine.start_actors(RunConfig().replace(engine={"actors": 5, "device": "cpu"}), log=print,
                            generator_cls=StandInGenerator, ranker_cls=StandInRanker)


def test_a_warm_engine_is_taken_once_by_its_settings_and_what_is_left_is_stopped(local_ray):
    """`pws-batch run` starts the actors while Prefect's API starts (engine.warm_up); the flow takes them
    (take_warm) for the same settings only, once; what no flow took is stopped (discard_warm)."""
    import ray

    config = RunConfig().replace(engine={"actors": 1, "device": "cpu"})
    with engine.use_actors(StandInGenerator, StandInRanker):
        assert engine.warm_up(config, log=lambda line: None)
        assert engine.take_warm(config.replace(engine={"micro_batch": 3})) is None  # other settings: not these
        started, pool = engine.take_warm(config)
        assert started is False and len(pool) == 1  # the test's Ray was already up: the run must not stop it
        assert pool.wait_ready(lambda line: None)[0]["role"] == "generator"
        assert engine.take_warm(config) is None  # taken once
        engine.stop_actors(pool)

        assert engine.warm_up(config, log=lambda line: None)
        (_, left), = engine._WARM.values()
        engine.discard_warm()
        assert engine._WARM == {}
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(left.workers[0].infos.remote(), timeout=60)
        # more actors than the cluster holds: nothing is left running, the flow will say why in its own words
        assert not engine.warm_up(config.replace(engine={"actors": 5}), log=lambda line: None)
        assert engine._WARM == {}


@pytest.mark.parametrize("device", ["stand-in", "cpu"])
def test_a_worker_scores_one_micro_batch_while_it_generates_the_next_never_two_of_either(device):
    """The Worker actor runs the driver's in-flight calls in threads: generation and scoring overlap (pipelined),
    but two micro-batches are never generated (or scored) at once; on a CPU device they take turns (generation
    already uses every core the actor has), each micro-batch scored before the next is generated (its scores
    are not kept waiting behind the other calls in flight). Each model is loaded and run by one thread (torch on
    a CPU is ~1.7x slower from another thread than the one that first ran it), never by the callers' threads."""
    from types import SimpleNamespace

    active, peak, overlapped, lock = {"gen": 0, "rank": 0}, {"gen": 0, "rank": 0}, [False], threading.Lock()
    order: list[str] = []
    threads = {"gen": set(), "rank": set(), "gen load": set(), "rank load": set()}

    def tracked(kind, method):
        def call(*args):
            with lock:
                threads[kind].add(threading.get_ident())
                order.append(kind)
                active[kind] += 1
                peak[kind] = max(peak[kind], active[kind])
                overlapped[0] |= active["gen"] and active["rank"]
            time.sleep(0.05)
            try:
                return method(*args)
            finally:
                with lock:
                    active[kind] -= 1
        return call

    class OnDevice(StandInGenerator):
        pipe = SimpleNamespace(device=SimpleNamespace(type=device))

        def __init__(self, *args, **kwargs):
            threads["gen load"].add(threading.get_ident())
            super().__init__(*args, **kwargs)

    class Ranker(StandInRanker):
        def __init__(self, *args, **kwargs):
            threads["rank load"].add(threading.get_ident())
            super().__init__(*args, **kwargs)

    worker = engine.Worker(RunConfig(), generator_cls=OnDevice, ranker_cls=Ranker)
    worker.generator.generate_batch = tracked("gen", worker.generator.generate_batch)
    worker.ranker.rank_batch = tracked("rank", worker.ranker.rank_batch)
    reqs = [request(i) for i in range(6)]
    out: dict[int, object] = {}
    callers = [threading.Thread(target=lambda i=i: out.__setitem__(i, worker.make_batch(reqs[i], 0, 3, [])))
               for i in range(6)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert peak == {"gen": 1, "rank": 1} and overlapped[0] == (device != "cpu")
    assert (order == ["gen", "rank"] * 6) == (device == "cpu"), order  # a GPU generates ahead of the scoring
    assert threads["gen"] == threads["gen load"] and threads["rank"] == threads["rank load"]
    assert len(threads["gen"]) == len(threads["rank"]) == 1
    assert (threads["gen"] == threads["rank"]) == (device == "cpu")
    assert not (threads["gen"] | threads["rank"]) & ({t.ident for t in callers} | {threading.get_ident()})
    assert all(out[i].ok and len(out[i].scored) == 3 and out[i].generated is None for i in range(6))
    assert [g["role"] for g in worker.infos()] == ["generator", "ranker"]
