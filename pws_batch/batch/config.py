"""The run config: one typed object built once by the CLI, passed whole to the flow and to the actors.

Each option is ONE dataclass field that carries its own flag, help text and whether it changes the dataset
(`fingerprint`). The CLI builds its flags from these fields (`add_flags`), reads them back (`from_args`), and the
resume check fingerprints the fields themselves: adding a run option means its field (here), and its use.

    RunConfig
      defaults  GenerationDefaults  values for manifest columns a row leaves empty (a row's own value wins)
      engine    EngineConfig        models, hardware, Ray
      plan      PlanConfig          sharding, what to do with an existing output
      ranking   RankingRule         how CLIP and CLAP scores become one order (pws_batch.batch.ranking)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pws_batch.batch.ranking import RankingRule
from pws_batch.core.models import DEFAULT_MODEL_SET
from pws_batch.core.params import DEVICES, DTYPES, VOCODERS, GenerationParams, check_params

AUDIO_FORMATS = ("wav", "flac")
_PARAMS = GenerationParams(image_prompt="", audio_prompt="")  # the one source of generation defaults


class RunError(ValueError):
    """A run that cannot start: says why and what to do."""


def option(default: Any, flag: str, help: str, *, fingerprint: bool = True, type: Any = None,
           choices: tuple | None = None, action: str | None = None) -> Any:
    """A config field with its command-line flag. `fingerprint=False`: changing it does not change the dataset."""
    return field(default=default, metadata={"flag": flag, "help": help, "fingerprint": fingerprint, "type": type,
                                            "choices": choices, "action": action})


@dataclass(frozen=True)
class GenerationDefaults:
    """Values for the manifest columns a row leaves empty (the run's flags); a row's own value always wins."""

    num_candidates: int = option(8, "--candidates", "candidates per pair")
    keep: int = option(1, "--keep", "best candidates kept per pair")
    steps: int = option(_PARAMS.steps, "--steps", "denoising steps")
    seed: int = option(0, "--seed", "base seed; candidate i uses seed + i")
    crop_columns: int = option(_PARAMS.crop_columns, "--crop-columns", "dark last columns dropped")
    grayscale_suffix: bool = option(True, "--no-grayscale-suffix", "do not append ', grayscale' to image prompts",
                                    action="store_false")
    target_clip: float | None = option(None, "--target-clip", "adaptive budget: stop a pair once --keep candidates "
                                       "score at least this CLIP (and --target-clap); default: no target",
                                       type=float)
    target_clap: float | None = option(None, "--target-clap", "adaptive budget: stop a pair once --keep candidates "
                                       "score at least this CLAP (and --target-clip); default: no target",
                                       type=float)

    def params(self, **row: Any) -> GenerationParams:
        """A pair's parameters: these defaults under the row's own values."""
        return GenerationParams(**{"num_candidates": self.num_candidates, "steps": self.steps, "seed": self.seed,
                                   "crop_columns": self.crop_columns, "grayscale_suffix": self.grayscale_suffix,
                                   **row})


@dataclass(frozen=True)
class EngineConfig:
    """Which models, on which hardware, on which Ray cluster."""

    models: str = option(DEFAULT_MODEL_SET, "--models",
                         "model set: sd15-auffusion (real hub ids), tiny (random offline weights), or a path to a "
                         "model_set.json / a folder holding one")
    device: str = option("auto", "--device", "auto, cpu or cuda", fingerprint=False, choices=DEVICES)
    dtype: str = option("auto", "--dtype", "auto = fp16 on CUDA, fp32 on CPU", choices=DTYPES)
    vocoder: str = option("hifigan", "--vocoder", "Auffusion's HiFi-GAN, or weight-free griffin-lim",
                          choices=VOCODERS)
    micro_batch: int = option(8, "--micro-batch", "candidates denoised together; lower it if memory runs out",
                              fingerprint=False)
    actors: int | None = option(None, "--actors", "generator actors (default: one per GPU of the cluster, or 1 "
                                                  "without GPUs)", fingerprint=False, type=int)
    ray_address: str | None = option(None, "--ray-address", "join this Ray cluster (default: $RAY_ADDRESS, else a "
                                                            "local Ray started for the run; 'local' also starts one)",
                                     fingerprint=False, type=str)


@dataclass(frozen=True)
class PlanConfig:
    """How the pairs are cut into shards (one Prefect task and one commit each), how they are written, and what
    to do with an existing output."""

    shard_size: int | None = option(None, "--shard-size", "pairs per shard = per Prefect task and per commit "
                                    "(default: auto, from the number of good pairs and of actors: about "
                                    "4 shards per actor, 1 to 256 pairs each; a resumed run keeps its size)",
                                    type=int)
    audio_format: str = option("wav", "--audio-format", "how the dataset stores the sounds: 16-bit wav, or "
                                                        "lossless flac (about half the size)", choices=AUDIO_FORMATS)
    allow_guides: tuple[str, ...] = option(
        (), "--allow-guides", "also read guide files from here: a path or URI prefix (e.g. s3://bucket/guides/), "
                              "'local' (any local file) or 'any' (anywhere); repeatable. Guides are always read from "
                              "the manifest's own storage; `run` and `validate` also read local files, `submit` (and "
                              "the flow it starts) nothing else unless allowed here",
        fingerprint=False, action="append")
    overwrite: bool = option(False, "--overwrite", "delete what an earlier run wrote to --out and start over "
                                                   "(default: resume, keeping committed shards)",
                             fingerprint=False, action="store_true")


@dataclass(frozen=True)
class RunConfig:
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    engine: EngineConfig = field(default_factory=EngineConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    ranking: RankingRule = field(default_factory=RankingRule)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return cls(**{s.name: s.type_cls(**d.get(s.name, {})) for s in _sections()})

    def replace(self, **sections: dict[str, Any]) -> "RunConfig":
        """A copy with some fields changed: `config.replace(engine={"models": "tiny"})`."""
        return dataclasses.replace(self, **{name: dataclasses.replace(getattr(self, name), **values)
                                            for name, values in sections.items()})

    def fingerprint(self) -> dict[str, Any]:
        """Every setting that changes the dataset, as `section.field`: a resumed run must agree on all of it."""
        return {f"{s.name}.{f.name}": getattr(getattr(self, s.name), f.name)
                for s in _sections() for f in dataclasses.fields(s.type_cls) if f.metadata.get("fingerprint", True)}

    def check(self) -> None:
        """Refuse a config no run could use, naming the flag (the manifest's rows are checked per row)."""
        for section, name in _AT_LEAST_ONE:
            value = getattr(getattr(self, section), name)
            if value is not None and value < 1:
                raise RunError(f"{_flag_of(name)} must be >= 1, got {value}")
        problems = check_params(self.defaults.params(image_prompt="x", audio_prompt="x"))
        if problems:
            raise RunError(f"{_flag_of(problems[0].field)} {problems[0].message} ({problems[0].fix})")
        for name in ("target_clip", "target_clap"):
            value = getattr(self.defaults, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise RunError(f"{_flag_of(name)} must be a finite number, got {value!r}")
        if self.defaults.keep > self.defaults.num_candidates:
            raise RunError(f"--keep {self.defaults.keep} is more than --candidates {self.defaults.num_candidates}")
        for prefix in self.plan.allow_guides or ():
            protocol = prefix.split("://", 1)[0] if "://" in prefix else None
            if protocol is not None and protocol not in _fsspec_protocols():
                raise RunError(f"--allow-guides {prefix}: no filesystem knows {protocol}:// (fsspec knows s3, gs, "
                               f"az, http(s), file, ...); give a path or URI prefix, `local` or `any`")


def _fsspec_protocols() -> set[str]:
    """Every protocol fsspec can resolve (installed or not: a missing s3fs is said when a guide is read)."""
    import fsspec

    return set(fsspec.available_protocols())


_AT_LEAST_ONE = (("defaults", "num_candidates"), ("defaults", "keep"), ("defaults", "steps"), ("plan", "shard_size"),
                 ("engine", "micro_batch"), ("engine", "actors"))


@dataclass(frozen=True)
class _Section:
    name: str
    type_cls: type


def _sections() -> list[_Section]:
    return [_Section(f.name, f.default_factory) for f in dataclasses.fields(RunConfig)]  # type: ignore[arg-type]


def _flag_of(name: str) -> str:
    for s in _sections():
        for f in dataclasses.fields(s.type_cls):
            if f.name == name:
                return f.metadata["flag"]
    return "--" + name.replace("_", "-")


def _dest(section: str, name: str) -> str:
    return f"cfg__{section}__{name}"


def add_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] | None = None,
              only: tuple[str, ...] | None = None) -> None:
    """One flag per config field (of all sections, or those named; all fields, or `only` those), grouped by
    section, with the default in the help."""
    titles = {"defaults": "defaults for columns a manifest leaves out (a row's own value wins)",
              "engine": "models, hardware and Ray", "plan": "sharding and an existing --out",
              "ranking": "ranking"}
    for s in _sections():
        if sections is not None and s.name not in sections:
            continue
        group = parser.add_argument_group(titles.get(s.name, s.name))
        for f in dataclasses.fields(s.type_cls):
            if only is not None and f.name not in only:
                continue
            meta = f.metadata
            kwargs: dict[str, Any] = {"dest": _dest(s.name, f.name), "default": None}
            shown = "" if f.default is None else f" (default: {f.default})"
            if meta.get("action"):
                kwargs.update(action=meta["action"])
                if meta["action"] == "append":
                    kwargs.update(metavar="PREFIX")
                shown = ""
            else:
                kwargs.update(type=meta.get("type") or type(f.default),
                              metavar=meta["flag"].lstrip("-").replace("-", "_").upper())
                if meta.get("choices"):
                    kwargs.update(choices=meta["choices"], metavar=None)
            if f.name == "overwrite":  # --resume (the default) or --overwrite, not both
                either = group.add_mutually_exclusive_group()
                either.add_argument("--resume", dest=kwargs["dest"], action="store_false", default=None,
                                    help="keep committed shards and generate the rest (default)")
                either.add_argument(meta["flag"], help=meta["help"], **kwargs)
                continue
            group.add_argument(meta["flag"], help=meta["help"] + shown, **kwargs)


def from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """The config the flags describe: each flag given replaces its field of `base` (default: all defaults)."""
    base = base or RunConfig()
    changes: dict[str, dict[str, Any]] = {}
    for s in _sections():
        for f in dataclasses.fields(s.type_cls):
            value = getattr(args, _dest(s.name, f.name), None)
            if isinstance(value, list):  # a repeatable flag (each use may also hold a comma-separated list)
                value = tuple(dict.fromkeys(v.strip() for part in value for v in part.split(",") if v.strip()))
            if value is not None:
                changes.setdefault(s.name, {})[f.name] = value
    try:
        config = base.replace(**changes)
    except ValueError as exc:  # RankingRule checks its own values
        raise RunError(str(exc)) from exc
    config.check()
    return config

