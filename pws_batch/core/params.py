"""Generation parameters of one prompt pair, with their defaults and checks.

Everything here is plain Python (no torch), so the CLI and the manifest validation can check a request
before any model is loaded (guide files are opened through `pws_batch.core.codec`, which does use torch). The defaults are those of the reference implementation (docs/algorithm.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

GRAYSCALE_SUFFIX = ", grayscale"
MAX_PROMPT_CHARS = 1000  # CLIP reads 77 tokens; anything this long is a mistake, not a prompt
MAX_STEPS = 1000
# Run-time choices (plain names here, so the CLI can list them without importing torch).
VOCODERS = ("hifigan", "griffin-lim")  # Auffusion's HiFi-GAN, or the weight-free Griffin-Lim
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "fp16", "bf16")  # auto = fp16 on CUDA, fp32 on CPU
# A pair's candidates stream from the generator to the ranker one micro-batch at a time, so memory does not grow
# with N; what grows is one pair's time on one GPU (and one shard task's): 4096 candidates at SD 1.5 speeds are
# about a GPU-day. Ask for more candidates as more rows (other seeds) of the manifest.
MAX_CANDIDATES = 4096
# Classifier-free guidance scales the difference of two noise estimates: the reference uses 7.5-10; at a few
# hundred the picture is saturated and the estimate overflows half precision (65504) within a few steps.
MAX_GUIDANCE = 100.0
# The base weights are normalised (lambda_x = w_x / (w_image + w_audio)): only their ratio matters. Outside
# [1e-3, 1e3] one model is silenced by rounding (or the sum overflows), which 0 says plainly.
MIN_WEIGHT, MAX_WEIGHT = 1e-3, 1e3


@dataclass
class GenerationParams:
    """One prompt pair and how to turn it into candidates (docs/algorithm.md, "One denoising step")."""

    image_prompt: str
    audio_prompt: str
    negative_image_prompt: str = ""
    negative_audio_prompt: str = ""
    guidance_image: float = 10.0
    guidance_audio: float = 10.0
    t_image: float = 0.9
    t_audio: float = 1.0
    weight_image: float = 0.5
    weight_audio: float = 0.5
    steps: int = 100
    strength: float = 1.0
    guide_audio: str | None = None
    guide_image: str | None = None
    num_candidates: int = 1
    seed: int = 0
    scheduler: str = "DDIMScheduler"
    grayscale_suffix: bool = True
    crop_columns: int = 32

    @property
    def effective_image_prompt(self) -> str:
        """The image prompt as the model sees it: the reference ends image prompts with ', grayscale'."""
        prompt = self.image_prompt.strip()
        if self.grayscale_suffix and not prompt.lower().endswith(GRAYSCALE_SUFFIX.strip(", ")):
            prompt += GRAYSCALE_SUFFIX
        return prompt

    @property
    def run_strength(self) -> float:
        """The strength actually used: a guide's, or 1 (pure noise, every step) when there is no guide."""
        return self.strength if (self.guide_audio or self.guide_image) else 1.0

    @property
    def candidate_seeds(self) -> list[int]:
        """Candidate i is drawn from its own generator seeded with seed + i (as the reference does)."""
        return [self.seed + i for i in range(self.num_candidates)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Problem:
    """One thing wrong with a request: which field, what is wrong, and how to fix it."""

    field: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" + (f" ({self.fix})" if self.fix else "")


@dataclass
class ParamsError(ValueError):
    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        return "; ".join(str(p) for p in self.problems)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_params(p: GenerationParams) -> list[Problem]:
    """Every problem of a request that can be seen without models: types, ranges, prompts.

    Guide files and the schedule need more context and are checked by `check_guides` and
    `pws_batch.core.sampler.check_schedule`.
    """
    problems: list[Problem] = []
    for name in ("image_prompt", "audio_prompt"):
        value = getattr(p, name)
        if not isinstance(value, str) or not value.strip():
            problems.append(Problem(name, "is empty", "give a non-empty text prompt"))
        elif len(value) > MAX_PROMPT_CHARS:
            problems.append(Problem(name, f"is {len(value)} characters long",
                                    f"keep prompts under {MAX_PROMPT_CHARS} characters; CLIP reads 77 tokens"))
    for name in ("negative_image_prompt", "negative_audio_prompt"):
        value = getattr(p, name)
        if not isinstance(value, str):
            problems.append(Problem(name, f"must be text, got {type(value).__name__}", 'use "" for none'))
        elif len(value) > MAX_PROMPT_CHARS:
            problems.append(Problem(name, f"is {len(value)} characters long",
                                    f"keep prompts under {MAX_PROMPT_CHARS} characters"))
    for name in ("guidance_image", "guidance_audio", "weight_image", "weight_audio"):
        value = getattr(p, name)
        if not _is_number(value):
            problems.append(Problem(name, f"must be a finite number, got {value!r}", "e.g. 7.5"))
        elif value < 0:
            problems.append(Problem(name, f"must be >= 0, got {value}", "use a non-negative value"))
        elif name.startswith("guidance") and value > MAX_GUIDANCE:
            problems.append(Problem(name, f"must be at most {MAX_GUIDANCE:g}, got {value:g}: guidance scales the "
                                          f"difference of two noise estimates, and beyond {MAX_GUIDANCE:g} the picture "
                                          f"saturates and half precision overflows",
                                    "the reference uses 7.5-10"))
        elif name.startswith("weight") and value != 0 and not MIN_WEIGHT <= value <= MAX_WEIGHT:
            problems.append(Problem(name, f"must be 0 or in [{MIN_WEIGHT:g}, {MAX_WEIGHT:g}], got {value:g}: the "
                                          f"weights are normalised, so only their ratio matters, and beyond this "
                                          f"range one model is lost to rounding or the sum overflows",
                                    "use weights like 0.5 / 0.5, or 0 to leave a model out"))
    if _is_number(p.weight_image) and _is_number(p.weight_audio) and p.weight_image == 0 == p.weight_audio:
        problems.append(Problem("weight_image", "both base weights are 0, so no model is ever active",
                                "give at least one of weight_image / weight_audio a positive value"))
    for name in ("t_image", "t_audio"):
        value = getattr(p, name)
        if not _is_number(value) or not 0 <= value <= 1:
            problems.append(Problem(name, f"must be in [0, 1], got {value!r}",
                                    "it is the fraction of T below which the model joins; 1 = from the start"))
    if not _is_number(p.strength) or not 0 < p.strength <= 1:
        problems.append(Problem("strength", f"must be in (0, 1], got {p.strength!r}",
                                "1 starts from pure noise; smaller values keep more of the guide"))
    if not isinstance(p.steps, int) or isinstance(p.steps, bool) or not 1 <= p.steps <= MAX_STEPS:
        problems.append(Problem("steps", f"must be an integer in [1, {MAX_STEPS}], got {p.steps!r}",
                                "the reference uses 100"))
    elif _is_number(p.strength) and 0 < p.strength <= 1 and int(p.steps * p.strength) < 1:
        problems.append(Problem("strength", f"steps x strength = {p.steps} x {p.strength} runs no step",
                                f"use strength >= {1 / p.steps:.3g} or more steps"))
    if not isinstance(p.num_candidates, int) or isinstance(p.num_candidates, bool) \
            or not 1 <= p.num_candidates <= MAX_CANDIDATES:
        problems.append(Problem("num_candidates", f"must be an integer in [1, {MAX_CANDIDATES}], "
                                                  f"got {p.num_candidates!r}: one pair runs on one GPU, and at SD 1.5 "
                                                  f"speeds {MAX_CANDIDATES} candidates take about a day",
                                "e.g. 50; for more, add rows with other seeds"))
    if not isinstance(p.seed, int) or isinstance(p.seed, bool) or not 0 <= p.seed < 2**63 - MAX_CANDIDATES:
        problems.append(Problem("seed", f"must be an integer in [0, 2**63 - {MAX_CANDIDATES}), got {p.seed!r} "
                                        f"(candidate i's seed is seed + i, a 64-bit integer)", "e.g. 0"))
    if not isinstance(p.crop_columns, int) or isinstance(p.crop_columns, bool) or not 0 <= p.crop_columns < 1024:
        problems.append(Problem("crop_columns", f"must be an integer in [0, 1024), got {p.crop_columns!r}",
                                "the reference drops 32"))
    if p.guide_audio and p.guide_image:
        problems.append(Problem("guide_audio", "both guide_audio and guide_image are set",
                                "give one guide at most"))
    if not isinstance(p.scheduler, str) or not p.scheduler.endswith("Scheduler"):
        problems.append(Problem("scheduler", f"must name a diffusers scheduler class, got {p.scheduler!r}",
                                "e.g. DDIMScheduler"))
    return problems


def check_guides(p: GenerationParams) -> list[Problem]:
    """Open the guide file, if any, and report it when it cannot be read as audio / an image."""
    from pws_batch.core.media import read_audio, read_image

    problems: list[Problem] = []
    if p.guide_audio:
        try:
            read_audio(p.guide_audio)
        except Exception as exc:  # noqa: BLE001 - any reason it is unreadable is reported
            problems.append(Problem("guide_audio", f"cannot read {p.guide_audio!r}: {exc}",
                                    "give a readable wav/flac/ogg file or URI"))
    if p.guide_image:
        try:
            read_image(p.guide_image)
        except Exception as exc:  # noqa: BLE001
            problems.append(Problem("guide_image", f"cannot read {p.guide_image!r}: {exc}",
                                    "give a readable png/jpg file or URI"))
    return problems


def raise_for_problems(problems: list[Problem]) -> None:
    if problems:
        raise ParamsError(problems)
