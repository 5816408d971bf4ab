"""The schedule without torch: which timesteps a request runs, and whether some model is active at each.

Validating a manifest checks every distinct schedule before any work (docs/algorithm.md, "The schedule"). For the
default DDIMScheduler and for EulerDiscreteScheduler the timesteps are computed here with numpy exactly as
diffusers' `set_timesteps` computes them (their three `timestep_spacing` modes; tests compare the two), so
`pws-batch validate` and a run's driver import neither torch nor diffusers for them. Any other scheduler class (or
an Euler config with Karras, exponential or beta sigmas) is built through diffusers, which validation does in a
child process (`diffusers_in_a_child`): the validating process imports neither torch nor diffusers in any case. A
name that is no scheduler class of the installed diffusers is told from the names diffusers' `__init__.py`
declares (read, not run: importing diffusers imports torch, ~300 MB).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

# DDIMScheduler's own defaults for the keys a scheduler config may lack (SD 1.5 ships a PNDMScheduler config:
# DDIMScheduler.from_config keeps the keys it knows and takes its defaults for the rest).
DDIM_DEFAULTS = {"num_train_timesteps": 1000, "steps_offset": 0, "timestep_spacing": "leading"}


class ScheduleError(ValueError):
    """A parameter set under which no model is active at some step."""


def heaviside(x: float) -> float:
    """H(x) = 1 if x >= 0 else 0 (x within float rounding of 0 counts as 0: 0.9 * 1000 may be 899.99...)."""
    return 1.0 if x >= -1e-6 else 0.0


def branch_weight(t: float, t_start: float, base_weight: float, num_train_timesteps: int) -> float:
    """w_x(t) = a_x * H(t_x * T - t)."""
    return base_weight * heaviside(t_start * num_train_timesteps - float(t))


def check_schedule(timesteps: Sequence[float], num_train_timesteps: int,
                   t_image: float, t_audio: float, weight_image: float = 0.5, weight_audio: float = 0.5) -> None:
    """Reject, before any work, a schedule under which both weights are 0 at some step that is run.

    The message names the first such timestep and the smallest t that would fix it (rounded UP to 6 decimals,
    so the printed value itself fixes it).
    """
    T = num_train_timesteps
    for step, t in enumerate(timesteps):
        t = float(t)
        if branch_weight(t, t_image, weight_image, T) + branch_weight(t, t_audio, weight_audio, T) > 0:
            continue
        # Both are off at the first timesteps run; the largest of them is the first.
        needed = math.ceil(max(float(x) for x in timesteps) / T * 1e6 - 1e-6) / 1e6
        models = (("image", t_image, weight_image), ("audio", t_audio, weight_audio))
        why = [f"the {name} model joins at t <= {t_x * T:g} (t_{name}={t_x:g})" if base > 0
               else f"the {name} model has base weight 0" for name, t_x, base in models]
        fixes = [f"t_{name} >= {needed:.6f}".rstrip("0") for name, _, base in models if base > 0]
        raise ScheduleError(
            f"no model is active at timestep {t:.4f}".rstrip("0").rstrip(".") +
            f" (step {step + 1} of {len(timesteps)}): {' and '.join(why)} of T={T}; set {' or '.join(fixes)}")
    return None


def steps_run(steps: int, strength: float) -> int:
    """`n = int(steps * strength)` steps are run: the last n of the full schedule (strength 1 runs them all)."""
    n = min(int(steps * strength), steps)
    if n < 1:
        raise ScheduleError(f"steps x strength = {steps} x {strength} runs no step")
    return n


def ddim_timesteps(scheduler_config: dict, steps: int) -> tuple[np.ndarray, int]:
    """DDIMScheduler's full schedule for `steps` steps (int64, descending) and T, as diffusers sets it."""
    config = {**DDIM_DEFAULTS, **{k: v for k, v in scheduler_config.items() if k in DDIM_DEFAULTS}}
    T, spacing = int(config["num_train_timesteps"]), config["timestep_spacing"]
    if steps > T:
        raise ValueError(f"`num_inference_steps`: {steps} cannot be larger than `self.config.train_timesteps`: {T} "
                         f"as the unet model trained with this scheduler can only handle maximal {T} timesteps.")
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, steps).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        timesteps = (np.arange(0, steps) * (T // steps)).round()[::-1].copy().astype(np.int64)
        timesteps += int(config["steps_offset"])
    elif spacing == "trailing":
        timesteps = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    else:
        raise ValueError(f"{spacing} is not supported. Please make sure to choose one of 'leading' or 'trailing'.")
    return timesteps, T


# EulerDiscreteScheduler's defaults for the keys its timesteps depend on; the sigma options below move the
# timesteps through the noise schedule (`_sigma_to_t`), and such a config is left to diffusers itself.
EULER_DEFAULTS = {"num_train_timesteps": 1000, "steps_offset": 0, "timestep_spacing": "linspace",
                  "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                  "timestep_type": "discrete", "prediction_type": "epsilon"}


def euler_timesteps(scheduler_config: dict, steps: int) -> tuple[np.ndarray, int] | None:
    """EulerDiscreteScheduler's full schedule for `steps` steps (float32, descending) and T, as diffusers sets it;
    None for a config whose timesteps come from its sigmas (Karras, exponential or beta sigmas, or continuous
    v-prediction timesteps): diffusers computes those."""
    config = {**EULER_DEFAULTS, **{k: v for k, v in scheduler_config.items() if k in EULER_DEFAULTS}}
    if (config["use_karras_sigmas"] or config["use_exponential_sigmas"] or config["use_beta_sigmas"]
            or (config["timestep_type"] == "continuous" and config["prediction_type"] == "v_prediction")):
        return None
    T, spacing = int(config["num_train_timesteps"]), config["timestep_spacing"]
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        timesteps = (np.arange(0, steps) * (T // steps)).round()[::-1].copy().astype(np.float32)
        timesteps += config["steps_offset"]
    elif spacing == "trailing":
        timesteps = np.arange(T, 0, -T / steps).round().copy().astype(np.float32)
        timesteps -= 1
    else:
        raise ValueError(f"{spacing} is not supported. Please make sure to choose one of 'linspace', 'leading' or "
                         f"'trailing'.")
    return timesteps, T


# The schedulers whose timesteps are computed here, without torch (each as diffusers computes them; tested).
TORCH_FREE = {"DDIMScheduler": ddim_timesteps, "EulerDiscreteScheduler": euler_timesteps}


def schedule_timesteps(scheduler: str, scheduler_config: dict, steps: int, strength: float) -> tuple[list[float], int]:
    """The timesteps a request runs and T, without any model: for checking parameters up front. Any class but
    those of TORCH_FREE goes through diffusers: in this process, or inside `diffusers_in_a_child()` in the child
    process it starts."""
    full = TORCH_FREE[scheduler](scheduler_config, steps) if scheduler in TORCH_FREE else None
    if full is not None:
        timesteps, T = full
        return [float(t) for t in timesteps[steps - steps_run(steps, strength):]], T
    check_scheduler_name(scheduler)  # an unknown name is told here, without diffusers
    if _child is not None:
        answer = _child.ask(scheduler, scheduler_config, steps, strength)
        if answer is not None:
            return answer
    return _through_diffusers(scheduler, scheduler_config, steps, strength)


def _through_diffusers(scheduler: str, scheduler_config: dict, steps: int, strength: float
                       ) -> tuple[list[float], int]:
    built = make_scheduler(scheduler, scheduler_config)  # any other class: through diffusers (imports torch)
    from pws_batch.core.sampler import run_timesteps

    return [float(t) for t in run_timesteps(built, steps, strength)], int(built.config.num_train_timesteps)


# The child process of `diffusers_in_a_child`: reads one JSON request per line, answers one JSON line each.
_CHILD_CODE = """
import json, sys
from pws_batch.core.schedule import _through_diffusers
for line in sys.stdin:
    scheduler, config, steps, strength = json.loads(line)
    try:
        timesteps, T = _through_diffusers(scheduler, config, steps, strength)
        answer = {"timesteps": timesteps, "T": T}
    except ValueError as exc:
        answer = {"error": str(exc)}
    print(json.dumps(answer), flush=True)
"""
_child: "_DiffusersChild | None" = None  # the child of the diffusers_in_a_child block running, if any


class _DiffusersChild:
    """A child process that computes timesteps through diffusers, so that the caller never imports torch."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.lock = threading.RLock()
        self.cache: dict[str, tuple[list[float], int] | str] = {}
        self.failed = False  # a child that died is not started again: this process computes the rest

    def ask(self, scheduler: str, config: dict, steps: int, strength: float) -> tuple[list[float], int] | None:
        """The answer (a ValueError raised as diffusers raised it), or None when the child cannot give one (the
        caller computes it itself)."""
        try:
            request = json.dumps([scheduler, config, steps, strength])
        except (TypeError, ValueError):  # a config JSON cannot carry
            return None
        with self.lock:
            if request not in self.cache:
                if self.failed:
                    return None
                try:
                    if self.process is None:
                        self.process = subprocess.Popen([sys.executable, "-c", _CHILD_CODE], stdin=subprocess.PIPE,
                                                        stdout=subprocess.PIPE, text=True)
                    self.process.stdin.write(request + "\n")
                    self.process.stdin.flush()
                    answer = json.loads(self.process.stdout.readline())
                    if not isinstance(answer, dict) or not ("error" in answer or "timesteps" in answer):
                        raise ValueError(f"unexpected answer {answer!r}")
                except (OSError, ValueError):  # it died or answered garbage: compute here
                    self.failed = True
                    self.close()
                    return None
                self.cache[request] = (answer["error"] if "error" in answer
                                       else (answer["timesteps"], int(answer["T"])))
        answer = self.cache[request]
        if isinstance(answer, str):
            raise ValueError(answer)
        return answer

    def close(self) -> None:
        with self.lock:
            if self.process is not None:
                try:
                    self.process.stdin.close()
                    self.process.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    self.process.kill()
                self.process = None


@contextmanager
def diffusers_in_a_child() -> Iterator[None]:
    """Within it, schedule_timesteps computes the timesteps of any scheduler class diffusers must build (not
    DDIM's or Euler's) in one child process, started when first needed and stopped at the end: this process
    never imports torch or diffusers (~330 MB, kept for its life once imported). Validation runs in it."""
    global _child
    if _child is not None:  # nested: the outer one owns it
        yield
        return
    _child = child = _DiffusersChild()
    try:
        yield
    finally:
        _child = None
        child.close()


@functools.lru_cache(maxsize=1)
def declared_scheduler_names() -> frozenset[str] | None:
    """Every class name diffusers' top-level `__init__.py` declares under `_import_structure["schedulers"]`
    (including those it declares only when an optional dependency is there), read from its source without
    running it; None when diffusers is missing or declares them some other way (then only an import can tell)."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None or not spec.origin:
        return None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None

    def is_schedulers(node) -> bool:  # _import_structure["schedulers"]
        return (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                and node.value.id == "_import_structure" and isinstance(node.slice, ast.Constant)
                and node.slice.value == "schedulers")

    def strings(node) -> list[str]:
        if isinstance(node, (ast.List, ast.Tuple)):
            return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        return []

    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(is_schedulers(t) for t in node.targets):
            names.update(strings(node.value))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("extend", "append") and is_schedulers(node.func.value)):
            for arg in node.args:
                names.update(strings(arg) or ([arg.value] if isinstance(arg, ast.Constant) else []))
    names = {n for n in names if isinstance(n, str) and n.endswith("Scheduler")}
    return frozenset(names) if "DDIMScheduler" in names else None


def _unknown_scheduler(name: str) -> ValueError:
    return ValueError(f"unknown scheduler {name!r}: use a diffusers scheduler class name such as "
                      f"DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler")


def check_scheduler_name(name: str) -> None:
    """ValueError for a name that is no scheduler class of the installed diffusers, as far as can be told
    without importing it (the name's ending; the names its __init__.py declares)."""
    declared = declared_scheduler_names()
    if not name.endswith("Scheduler") or (declared is not None and name not in declared):
        raise _unknown_scheduler(name)


def make_scheduler(name: str, config: dict):
    """Any diffusers scheduler class by name, built from the image model's scheduler config."""
    check_scheduler_name(name)
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise _unknown_scheduler(name)
    return cls.from_config(config)


def checked_timesteps(params, scheduler_config: dict) -> tuple[list[float], int]:
    """The timesteps a request (GenerationParams) runs and T, after rejecting a schedule with no active model
    (ScheduleError)."""
    timesteps, T = schedule_timesteps(params.scheduler, scheduler_config, params.steps, params.run_strength)
    check_schedule(timesteps, T, params.t_image, params.t_audio, params.weight_image, params.weight_audio)
    return timesteps, T
