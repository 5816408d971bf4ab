"""Ray actors that hold the models, and the dispatch of a shard's pairs to them.

Ray's batch-inference pattern: each actor loads its models ONCE, in its constructor, and then serves many
pairs. One worker actor per GPU (or a CPU actor) holds a Generator (both diffusion models and the vocoder: a
pair's candidates in the batched sampler) and a Ranker (CLIP and CLAP: scores them and keeps the best). A
shard's pairs stream through one worker a micro-batch at a time (`run_pairs`): it makes the next micro-batch
while it scores the last, so memory stays flat in N, and a pair with targets stops once they are met
(pws_batch.batch.stream). Workers restart on failure and retry their calls.

torch is imported only inside the actors: the driver (the Prefect flow) needs ray, not torch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from pws_batch.batch.config import RunConfig
from pws_batch.batch.pair import CandidateBatch, PairRequest, PairResult
from pws_batch.batch.stream import PairStream, Seen, score_batch
from pws_batch.core.allocator import CPU_MALLOC_ENV, malloc_env_started_with

MAX_RESTARTS = 2
MAX_TASK_RETRIES = 2
# Scorer loads in this process: an actor loads its models once, in its constructor, never per pair.
MODEL_LOADS: Counter = Counter()


class ModelsUnavailable(RuntimeError):
    """An actor could not load its models: the one-line reason, the same on every retry."""


def load_error_line(exc: BaseException) -> str:
    """A load failure as one line: ModelLoadError / ModelSetError already name the component and the fix."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    from pws_batch.core.models import ModelLoadError, ModelSetError

    return text if isinstance(exc, (ModelLoadError, ModelSetError)) else f"loading the models failed: {type(exc).__name__}: {text}"


def _where() -> dict[str, Any]:
    import ray

    info = {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        ctx = ray.get_runtime_context()
        info.update(node_id=ctx.get_node_id()[:12], actor_id=ctx.get_actor_id()[:12] if ctx.get_actor_id() else None,
                    gpu_ids=[str(g) for g in ray.get_gpu_ids()])
    except Exception:  # noqa: BLE001 - outside Ray (unit tests): no context
        pass
    return info


def _device_info(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    return "cpu"


class Generator:
    """Holds both diffusion models and the vocoder; makes one pair's candidates per call."""

    def __init__(self, config: RunConfig):
        from pws_batch.core.pipeline import ImagesThatSoundPipeline

        self.config = config
        engine = config.engine
        self.pipe, self.load_error = None, None
        t0 = time.perf_counter()
        try:
            self.pipe = ImagesThatSoundPipeline.from_model_set(engine.models, device=engine.device,
                                                               dtype=engine.dtype, vocoder=engine.vocoder)
        except Exception as exc:  # noqa: BLE001 - kept as one line: a restart would fail the same way
            self.load_error = load_error_line(exc)
        self.load_s = time.perf_counter() - t0
        self.pairs = 0

    def info(self) -> dict[str, Any]:
        from pws_batch.core.device import dtype_name
        from pws_batch.core.pipeline import ImagesThatSoundPipeline

        if self.pipe is None:
            return {"role": "generator", "model_loads": 0, "pairs": self.pairs, "load_s": round(self.load_s, 3),
                    "device": "none", "load_error": self.load_error, **_where()}
        return {"role": "generator", "model_loads": ImagesThatSoundPipeline.loads, "pairs": self.pairs,
                "load_s": round(self.load_s, 3), "device": _device_info(self.pipe.device),
                "dtype": dtype_name(self.pipe.dtype), "models": self.pipe.model_set.to_dict(),
                **_where()}

    def generate_batch(self, request: PairRequest, start: int, count: int) -> CandidateBatch:
        """Candidates `start` .. `start + count - 1` of a pair (one micro-batch), as arrays in `generated`."""
        t0 = time.perf_counter()
        if start == 0:
            self.pairs += 1
        if self.load_error:
            return CandidateBatch(request, start, count, error=self.load_error, generator=_where())
        seeds = request.params.candidate_seeds[start:start + count]
        try:
            result = self.pipe(request.params, micro_batch=self.config.engine.micro_batch, seeds=seeds)
        except Exception as exc:  # noqa: BLE001 - one bad pair must not sink the shard
            return CandidateBatch(request, start, count, error=f"{type(exc).__name__}: {exc}", generator=_where())
        return CandidateBatch(request, start, count, generated=result, unet_evals=sum(result.unet_evals.values()),
                              unet_evals_minimum=result.unet_evals_minimum,
                              generate_s=round(time.perf_counter() - t0, 4), generator=_where())


class Ranker:
    """Holds CLIP and CLAP; scores a pair's candidates, ranks them and returns only the kept ones' media."""

    def __init__(self, config: RunConfig):
        from pws_batch.core.device import resolve_device
        from pws_batch.core.models import load_scorer, resolve_model_set

        self.config = config
        self.load_error = None
        t0 = time.perf_counter()
        try:  # through the friendly loader: a missing model is one line naming it, never a traceback per retry
            device = resolve_device(config.engine.device)
            model_set = resolve_model_set(config.engine.models)
            self.clip = load_scorer("clip", model_set.clip, device)
            self.clap = load_scorer("clap", model_set.clap, device)
            MODEL_LOADS["ranker"] += 1
        except Exception as exc:  # noqa: BLE001
            device, self.load_error = "cpu", load_error_line(exc)
        self.load_s = time.perf_counter() - t0
        self.device = device
        self.pairs = 0

    def info(self) -> dict[str, Any]:
        return {"role": "ranker", "model_loads": 0 if self.load_error else MODEL_LOADS["ranker"], "pairs": self.pairs,
                "load_s": round(self.load_s, 3),
                "device": _device_info(self.device) if not self.load_error else "none",
                **({"load_error": self.load_error} if self.load_error else {}), **_where()}

    def rank_batch(self, batch: CandidateBatch, seen: Seen) -> CandidateBatch:
        """Score one micro-batch; encode the media only of the candidates that may still be kept (see
        pws_batch.batch.stream); drop the arrays."""
        from pws_batch.core.media import png_bytes, wav_bytes

        def failed(error: str) -> CandidateBatch:  # the arrays are dropped with the pair
            return dataclasses.replace(batch, generated=None, ranker=_where(), error=error)

        if not batch.ok:
            return batch
        if self.load_error:
            return failed(self.load_error)
        t0 = time.perf_counter()
        self.pairs += batch.start == 0
        request, candidates = batch.request, batch.generated.candidates
        try:
            clip = self.clip([c.image for c in candidates], request.params.effective_image_prompt)
            clap = self.clap([c.audio for c in candidates], request.params.audio_prompt)
        except Exception as exc:  # noqa: BLE001
            return failed(f"ranking failed: {type(exc).__name__}: {exc}")
        problem = nonfinite_scores(clip, clap)
        if problem:  # a NaN score would rank anywhere: the pair fails rather than keep a meaningless row
            return failed(problem)
        scored = score_batch(batch, clip, clap, seen, lambda c: (png_bytes(c.image), wav_bytes(c.audio)),
                             self.config.ranking)
        return dataclasses.replace(batch, generated=None, scored=scored, rank_s=round(time.perf_counter() - t0, 4),
                                   ranker=_where())


def nonfinite_scores(clip, clap) -> str | None:
    """The reason a pair fails when any CLIP or CLAP score is NaN or infinite, else None."""
    import numpy as np

    bad = {name: [i for i, v in enumerate(np.asarray(scores, dtype=np.float64)) if not np.isfinite(v)]
           for name, scores in (("CLIP", clip), ("CLAP", clap))}
    bad = {name: idx for name, idx in bad.items() if idx}
    if not bad:
        return None
    return ("non-finite scores: " + ", ".join(f"{name} of candidates {idx[:5]}" for name, idx in bad.items())
            + " are NaN or infinite (a broken picture or sound); nothing of the pair is kept")


# ---------------------------------------------------------------------------------------------- the worker
class Worker:
    """The Ray actor: one per GPU (or CPU actor), holding a Generator and a Ranker in one process.

    `make_batch` generates one micro-batch and scores it; the driver keeps a few calls in flight (the actor runs
    them in threads, `max_concurrency=LOOKAHEAD`) and the work is pipelined: while one call's candidates are
    scored, the next call's are generated, and never two of either at once (so one micro-batch of arrays is
    generated at a time, on one GPU). Each model is loaded and run by one thread of its own (the generator's, the
    ranker's), whichever of Ray's threads makes the call: torch on a CPU runs its operators ~1.7x slower from a
    thread other than the one that first ran them (measured: denoising 3.2 s instead of 1.8 s). On a CPU device
    one thread serves both, and each micro-batch is generated and scored in turn, as one job: generation already
    keeps every core of the actor busy, and scoring beside it would only make the two share them. The arrays go
    from generator to ranker inside the process: only scores and the media that may be kept leave it.
    `generator_cls` / `ranker_cls` replace the model-holding classes (pws_batch.batch.standins, for benchmarks
    and tests of the orchestration)."""

    def __init__(self, config: RunConfig, generator_cls: type | None = None, ranker_cls: type | None = None,
                 **kwargs: Any):
        from concurrent.futures import ThreadPoolExecutor

        self._generating = ThreadPoolExecutor(1, thread_name_prefix="generator")
        self.generator = self._generating.submit(generator_cls or Generator, config, **kwargs).result()
        self._ranking = (self._generating if _on_cpu(self.generator)
                         else ThreadPoolExecutor(1, thread_name_prefix="ranker"))
        self.ranker = self._ranking.submit(ranker_cls or Ranker, config, **kwargs).result()

    def infos(self) -> list[dict[str, Any]]:
        """The generator's info (with the glibc malloc settings its process started with: CPU actors get
        CPU_MALLOC_ENV; and its process's niceness: 0 on a local Ray or a CPU, see LOCAL_RAY_SYSTEM_CONFIG) and the
        ranker's."""
        return [{**self.generator.info(), "malloc_env": malloc_env_started_with(), "niceness": os.nice(0)},
                self.ranker.info()]

    def make_batch(self, request: PairRequest, start: int, count: int, seen: Seen) -> CandidateBatch:
        """Candidates `start` .. `start + count - 1` of a pair, generated and scored (see Ranker.rank_batch)."""
        if self._ranking is self._generating:
            # One thread for both (a CPU device): each micro-batch is scored as one job with its generation, not
            # queued behind the generation of the calls in flight after it. Scores come back one micro-batch
            # later, not LOOKAHEAD, and no generated arrays wait for their turn to be scored.
            return self._generating.submit(self._generate_and_rank, request, start, count, seen).result()
        batch = self._generating.submit(self.generator.generate_batch, request, start, count).result()
        return self._ranking.submit(self.ranker.rank_batch, batch, seen).result()

    def _generate_and_rank(self, request: PairRequest, start: int, count: int, seen: Seen) -> CandidateBatch:
        return self.ranker.rank_batch(self.generator.generate_batch(request, start, count), seen)


def _on_cpu(generator: Any) -> bool:
    """Whether the generator's models run on the CPU (a stand-in has no models: it stands in for a GPU)."""
    device = getattr(getattr(generator, "pipe", None), "device", None)
    return getattr(device, "type", None) == "cpu"


# ---------------------------------------------------------------------------------------------- the pool
class ActorPool:
    """The run's workers (one per GPU), created once per run; a shard borrows one worker for its whole run."""

    def __init__(self, workers: list, config: RunConfig | None = None):
        self.workers = workers
        self.config = config or RunConfig()
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(len(workers)):
            self._free.put(i)

    def __len__(self) -> int:
        return len(self.workers)

    @contextmanager
    def borrow(self) -> Iterator[tuple[int, Any]]:
        i = self._free.get()
        try:
            yield i, self.workers[i]
        finally:
            self._free.put(i)

    def infos(self) -> list[dict]:
        """The generator's and the ranker's info of every worker."""
        import ray

        return [info for infos in ray.get([w.infos.remote() for w in self.workers]) for info in infos]

    def wait_ready(self, log: Callable[[str], None]) -> list[dict]:
        """Wait until every worker has loaded its models; log where each runs. ModelsUnavailable (and the workers
        stopped) when they could not load them."""
        infos = self.infos()
        errors = sorted({info["load_error"] for info in infos if info.get("load_error")})
        if errors:  # one line, the same for every worker: not a traceback per restart
            stop_actors(self)
            raise ModelsUnavailable("; ".join(errors))
        for info in infos:
            actor = f" (actor {info['actor_id']})" if info.get("actor_id") else ""
            log(f"{info['role']} on {info['host']} pid {info['pid']}{actor}: device {info['device']}, GPUs "
                f"{info.get('gpu_ids') or 'none'}, models loaded {info['model_loads']}x in {info['load_s']:.1f} s")
        return infos


def ray_environment(address: str | None) -> str | None:
    """Set what Ray reads when it is IMPORTED (call this before any `import ray`); returns the address to join
    (`address`, else $RAY_ADDRESS, else None: a local Ray, also for "local")."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address == "local":  # Ray's own word for a new local instance: as no address at all
        address = None
    # A Ray call after this run's ray.shutdown (a Prefect task still running as Ctrl-C stops the flow) must fail,
    # not start a second local Ray from that thread
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    if address:
        # Ray 2.60 keeps token auth on; a client joining by address (host:port, or ray:// for Ray Client) must
        # say so. The token is ~/.ray/auth_token or $RAY_AUTH_TOKEN, set up by the operator.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    else:
        # A Ray started for one run serves this machine only: keep it on loopback. Ray otherwise swaps 127.0.0.1
        # for the machine's address; this setting is how it runs single-machine clusters.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return address


class PlacementError(ValueError):
    """The cluster cannot hold the actors asked for (the message says what it has and what to pass)."""


class RayUnreachable(RuntimeError):
    """Nothing answers at the cluster address given (the message names it and what to check)."""


RAY_PROBE_S = 10.0  # seconds to wait for the cluster's port to answer


def check_ray_address(address: str | None, timeout: float = RAY_PROBE_S) -> None:
    """Fail in seconds, in one line, when nothing listens at the cluster `address` (host:port or
    ray://host:port): ray.init would retry it for ever. "auto", "local" and addresses without a port are Ray's
    to resolve."""
    if not address or address in ("auto", "local"):
        return
    host, sep, port = (address.split("://", 1)[1] if "://" in address else address).rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        why = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise RayUnreachable(f"cannot reach the Ray cluster at {address} ({why}); check --ray-address and "
                             f"$RAY_ADDRESS (unset both for a local Ray)") from exc


CLIENT_ATTEMPTS = 3  # joins through Ray Client (ray://) whose server side failed to start, before giving up


def connect_ray(address: str | None, num_cpus: int | None = None, log: Callable[[str], None] | None = None,
                pause_s: float = 5.0) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local Ray for this run.

    Through Ray Client the head starts a server process for each connection; on a busy head it can die before it
    serves ("Initialization failure from server ... Starting Ray client server failed"), and a new connection
    gets a new one: such a join is tried CLIENT_ATTEMPTS times, `pause_s` apart (said through `log`).
    Returns True when this call started (and so must stop) a local Ray.
    """
    address = ray_environment(address)
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_ray_address(address)
        for attempt in range(1, CLIENT_ATTEMPTS + 1):
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                return False
            except ConnectionAbortedError as exc:  # Ray Client's "Initialization failure from server"
                if not address.startswith("ray://") or attempt == CLIENT_ATTEMPTS:
                    raise
                if log is not None:
                    first = next((line for line in str(exc).splitlines() if line.strip()), "")
                    log(f"Ray: joining {address} failed on the server's side ({first.strip()}); "
                        f"trying again in {pause_s:g} s (attempt {attempt + 1} of {CLIENT_ATTEMPTS})")
                time.sleep(pause_s)
    start_local_ray(num_cpus=num_cpus)
    return True


def start_local_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """A new local Ray for this process (after ray_environment: it sets what Ray reads when imported), as every
    command starts one: its workers at the default priority (LOCAL_RAY_SYSTEM_CONFIG); `address="local"`, a new
    instance even where a `ray start` on this host left its address in Ray's temp folder (a bare ray.init() would
    join that cluster, or fail on a stale one); Ray's own start-up lines (token auth is on, "Started a local Ray
    instance") left out: a run logs where it runs in one line of its own (describe_cluster), Ray's other warnings
    still show."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, _system_config=LOCAL_RAY_SYSTEM_CONFIG)


def describe_cluster(started_here: bool, address: str | None = None) -> str:
    """One line: the Ray this run started or joined (at `address` as given, and its GCS when that differs: through
    Ray Client the head's own address), its nodes, CPUs and GPUs."""
    import ray

    resources = ray.cluster_resources()
    try:
        gcs = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - through Ray Client (ray://) the context may have no GCS address
        gcs = None
    given = address or os.environ.get("RAY_ADDRESS")
    if started_here:
        where = f"started a local Ray at {gcs or '?'}"
    elif given and gcs and given != gcs:
        where = f"joined the Ray cluster at {given} (its GCS at {gcs})"
    else:
        where = f"joined the Ray cluster at {gcs or given or '?'}"
    return (f"Ray: {where}; {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs")


def start_actors(config: RunConfig, log: Callable[[str], None], generator_cls: type | None = None,
                 ranker_cls: type | None = None, actor_kwargs: dict | None = None, wait: bool = True) -> ActorPool:
    """One generator per GPU (or `--actors`), each with its ranker; on a machine without GPUs, CPU actors.

    `wait=False` returns as soon as the actors are created, while they load their models (`pool.wait_ready`).

    `generator_cls` / `ranker_cls` (with `actor_kwargs` for their constructors) replace the model-holding actors:
    `pws_batch.batch.standins` for benchmarks and tests of the orchestration.
    """
    import ray

    actors = config.engine.actors
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    use_gpu = gpus > 0 and config.engine.device != "cpu"
    n = actors or (gpus if use_gpu else 1)
    if not use_gpu and cpus < 1:  # e.g. a GPU cluster whose GPU workers are not up yet: CPU actors would wait forever
        raise PlacementError("the Ray cluster has no GPU and no CPU free for actors (are its GPU workers up? "
                             "`ray status` / `kubectl get raycluster`); or pass --actors with --device cpu")
    if use_gpu and n > gpus:
        raise PlacementError(f"--actors {n}: the cluster has {gpus} GPU(s); one worker needs one GPU")
    if not use_gpu and n > cpus:
        raise PlacementError(f"--actors {n}: the cluster has {cpus} CPU(s) and no GPU; use --actors {cpus} or "
                             f"fewer")
    opts = worker_placement(use_gpu, cpus // n)
    kwargs = dict(actor_kwargs or {}, generator_cls=generator_cls, ranker_cls=ranker_cls)
    workers = [ray.remote(Worker).options(**opts, max_concurrency=LOOKAHEAD, max_restarts=MAX_RESTARTS,
                                          max_task_retries=MAX_TASK_RETRIES).remote(config, **kwargs)
               for _ in range(n)]
    pool = ActorPool(workers, config)
    if wait:
        pool.wait_ready(log)
    return pool


# Ray starts its workers at nice 15 (its worker_niceness): every process at the default priority beside them (Ray's
# own GCS, raylet, agents, log monitor; the driver; the Prefect API) then takes the cores from the model threads
# whenever it wakes. A worker is the job here, not a background chore: on a local Ray this run starts, every worker
# keeps the default priority (LOCAL_RAY_SYSTEM_CONFIG); on a joined cluster, CPU workers do (WORKER_PRIORITY_ENV in
# the runtime_env they get anyway), and GPU workers get what the cluster's `ray start` set (cluster/README.md): a
# runtime_env only for this would make Ray start each of them afresh instead of taking a worker it has ready.
# Measured on 2 cores with the tiny models: the same work 3-7 % slower in a Ray worker at nice 15 than in a plain
# process beside the same Ray, and as fast at nice 0 (`bench pipeline --ray-baseline`).
LOCAL_RAY_SYSTEM_CONFIG = {"worker_niceness": 0}
WORKER_PRIORITY_ENV = {"RAY_worker_niceness": "0"}


def worker_placement(use_gpu: bool, cpus: int) -> dict[str, Any]:
    """Ray options that place one worker: a whole GPU; or, without GPUs, `cpus` CPUs (Ray gives it as many torch
    threads), glibc malloc settings that keep freed memory for the next step (pws_batch.core.allocator: ~1.4x
    faster on a CPU) and the default priority (WORKER_PRIORITY_ENV), merged into the job's own runtime_env, if
    any."""
    if use_gpu:
        return dict(num_gpus=1, num_cpus=1)
    return dict(num_gpus=0, num_cpus=max(1, cpus),
                runtime_env={"env_vars": {**CPU_MALLOC_ENV, **WORKER_PRIORITY_ENV}})


# The actor classes the flow's runs use in this process; `use_actors` swaps in stand-ins (pws_batch.batch.standins)
# so that `pws-batch bench cluster` runs the real flow, dispatch and writer without models.
ACTOR_CLASSES: dict[str, Any] = {}


@contextmanager
def use_actors(generator_cls: type, ranker_cls: type, **actor_kwargs: Any) -> Iterator[None]:
    ACTOR_CLASSES.update(generator_cls=generator_cls, ranker_cls=ranker_cls, actor_kwargs=actor_kwargs)
    try:
        yield
    finally:
        ACTOR_CLASSES.clear()


def stop_actors(pool: ActorPool | None) -> None:
    import ray

    if pool is None:
        return
    for actor in pool.workers:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


# Micro-batches in flight per worker (one generated, one scored, one queued): the generator always has the next
# one queued, and a worker holds the arrays of at most two micro-batches.
LOOKAHEAD = 3


def run_pairs(pool: ActorPool, requests: list[PairRequest],
              on_ranked: Callable[[PairRequest], None] | None = None) -> tuple[list[PairResult], dict]:
    """Generate and rank a shard's pairs on one borrowed worker, micro-batch by micro-batch; results in
    request order. `on_ranked` is called with each request as soon as its pair is ranked (a progress bar in pairs).

    Each micro-batch is one make_batch call: the worker generates it and scores it in its own process (the arrays
    never leave it); the driver sees only scores and the media that may be kept. A pair with targets queues its
    next micro-batch only once the last one is scored (and stops when they are met); meanwhile the worker
    generates the next pair's, so it is never left idle while there is work in the shard.
    """
    import ray

    micro_batch, rule = pool.config.engine.micro_batch, pool.config.ranking
    t_wait = time.perf_counter()
    with pool.borrow() as (i, worker):
        waited = time.perf_counter() - t_wait
        streams = [PairStream(r, micro_batch) for r in requests]
        in_flight: dict[Any, PairStream] = {}
        peak = batches = 0
        while True:
            while len(in_flight) < LOOKAHEAD:
                stream = next((s for s in streams if s.can_submit()), None)
                if stream is None:
                    break
                start, count = stream.submit()
                in_flight[worker.make_batch.remote(stream.request, start, count, stream.seen())] = stream
                batches += 1
            if not in_flight:
                break
            peak = max(peak, len(in_flight))
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            stream = in_flight.pop(ready[0])
            stream.add(ray.get(ready[0]))
            if on_ranked is not None and stream.finished:
                on_ranked(stream.request)
        return [s.result(rule) for s in streams], {"worker": i, "micro_batches": batches,
                                                   "micro_batches_in_flight_max": peak,
                                                   "actor_wait_s": round(waited, 3)}


# Engines of the runs in this process, by run key: Prefect tasks (threads of the flow run) find theirs here.
_POOLS: dict[str, ActorPool] = {}
_LOCK = threading.Lock()


def register_pool(key: str, pool: ActorPool) -> None:
    with _LOCK:
        _POOLS[key] = pool


class RunStopped(RuntimeError):
    """The run's engine is gone (the flow is ending: Ctrl-C, or an error elsewhere): a shard that meets this is not
    retried (its committed work is kept; a re-run resumes)."""


def get_pool(key: str) -> ActorPool:
    with _LOCK:
        if key not in _POOLS:
            raise RunStopped(f"no actors for run {key}: the flow's engine is not running in this process (the run "
                             f"stopped, or this is not the process of its flow)")
        return _POOLS[key]


def has_pool(key: str) -> bool:
    with _LOCK:
        return key in _POOLS


def unregister_pool(key: str) -> ActorPool | None:
    with _LOCK:
        return _POOLS.pop(key, None)


# ---------------------------------------------------------------------------------------------- warm start
# `pws-batch run` starts Ray and the run's actors (they load their models) while Prefect's API server starts, and
# the flow run it then makes in this process takes them (`take_warm`) instead of starting its own: start-up costs
# the longer of the two, not their sum. Keyed by the engine settings and actor classes; what no flow took is
# stopped by `discard_warm`.
_WARM: dict[str, tuple[bool, ActorPool]] = {}


def _engine_key(config: RunConfig) -> str:
    return repr(config.engine) + repr(sorted((k, repr(v)) for k, v in ACTOR_CLASSES.items()))


def warm_up(config: RunConfig, log: Callable[[str], None]) -> bool:
    """Start (or join) Ray and create the run's actors without waiting for their models. False, with nothing
    left running, when that fails: the flow then starts the engine itself and reports why it cannot."""
    started = False
    try:
        started = connect_ray(config.engine.ray_address, log=log)
        pool = start_actors(config, log, wait=False, **ACTOR_CLASSES)
    except Exception:  # noqa: BLE001 - e.g. --actors beyond the cluster: said by the flow, in its words
        if started:
            import ray

            ray.shutdown()
        return False
    with _LOCK:
        _WARM[_engine_key(config)] = (started, pool)
    return True


def take_warm(config: RunConfig) -> tuple[bool, ActorPool] | None:
    """The Ray (whether this process started it) and actors `warm_up` made for these settings, if any."""
    with _LOCK:
        return _WARM.pop(_engine_key(config), None)


def discard_warm() -> None:
    """Stop what `warm_up` started and no flow took."""
    import ray

    with _LOCK:
        left = list(_WARM.values())
        _WARM.clear()
    for started, pool in left:
        stop_actors(pool)
        if started:
            ray.shutdown()
