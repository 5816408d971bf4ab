"""Model sets: which weights make up a run, and loading them the real way (`from_pretrained`).

A model set names every component: the image pipeline (Stable Diffusion 1.5), the audio pipeline
(Auffusion), the vocoder (a folder holding `vocoder/`), CLIP and CLAP. Built in:

- `sd15-auffusion` (default): the real Hugging Face hub ids;
- `tiny`: random weights built offline into a cache folder on first use (`pws-batch models build-tiny`).

`--models` also takes a path to a `model_set.json` (or a folder holding one) whose entries are hub ids or
paths (relative to the file); entries it leaves out come from `sd15-auffusion`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

DEFAULT_MODEL_SET = "sd15-auffusion"
MODEL_SET_FILE = "model_set.json"
COMPONENTS = ("image", "audio", "vocoder", "clip", "clap")


@dataclass(frozen=True)
class ModelSet:
    name: str
    image: str  # diffusers Stable Diffusion folder or hub id
    audio: str  # diffusers Auffusion folder or hub id
    vocoder: str  # folder or hub id holding the vocoder subfolder
    clip: str  # transformers CLIPModel + CLIPProcessor
    clap: str  # transformers ClapModel + ClapProcessor
    vocoder_subfolder: str = "vocoder"

    def ids(self) -> dict[str, str]:
        return {c: getattr(self, c) for c in COMPONENTS}

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


SD15_AUFFUSION = ModelSet(
    name=DEFAULT_MODEL_SET,
    image="stable-diffusion-v1-5/stable-diffusion-v1-5",
    audio="auffusion/auffusion-full-no-adapter",
    vocoder="auffusion/auffusion-full-no-adapter",
    clip="openai/clip-vit-base-patch16",
    clap="laion/clap-htsat-unfused",
)
BUILTIN = (DEFAULT_MODEL_SET, "tiny")


class ModelSetError(ValueError):
    """An unknown or malformed model set."""


class ModelLoadError(RuntimeError):
    """A component could not be loaded: names the component, the id, and how to get it."""


def cache_home() -> str:
    """Where pws-batch keeps what it builds (the tiny models): $PWS_BATCH_HOME or ~/.cache/pws-batch."""
    return os.environ.get("PWS_BATCH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "pws-batch")


def tiny_dir() -> str:
    from pws_batch.core.tiny import TINY_VERSION

    return os.path.join(cache_home(), f"tiny-v{TINY_VERSION}")


def ensure_tiny(folder: str | None = None) -> str:
    """The tiny model set's folder, built first if it is not there yet."""
    folder = folder or tiny_dir()
    if not os.path.isfile(os.path.join(folder, MODEL_SET_FILE)):
        from pws_batch.core.tiny import build_tiny

        build_tiny(folder)
    return folder


def check_model_set_spec(spec: str) -> None:
    """Cheap check of a --models value (no building, no loading), for argument validation."""
    if spec in BUILTIN:
        return
    path = os.path.join(spec, MODEL_SET_FILE) if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ModelSetError(f"unknown model set {spec!r}: use one of {', '.join(BUILTIN)}, or a path to a "
                            f"{MODEL_SET_FILE} (or a folder holding one)")


def load_model_set_file(path: str) -> ModelSet:
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelSetError(f"cannot read model set {path}: {exc}") from exc
    if not isinstance(entries, dict):
        raise ModelSetError(f"model set {path} must hold a JSON object with keys {', '.join(COMPONENTS)}")
    unknown = set(entries) - set(COMPONENTS) - {"name", "vocoder_subfolder", "tiny_version", "sources"}
    if unknown:
        raise ModelSetError(f"model set {path} has unknown keys {sorted(unknown)}; known: {', '.join(COMPONENTS)}")
    values = SD15_AUFFUSION.to_dict()
    values["name"] = entries.get("name", os.path.basename(base))
    for key in (*COMPONENTS, "vocoder_subfolder"):
        if key in entries:
            value = str(entries[key])
            local = os.path.join(base, value)
            # A path relative to the file, also when it does not exist (so that a missing folder is reported
            # where it was looked for, not relative to the working directory); "org/name" stays a hub id.
            path_like = not value.startswith("~") and (value.startswith(".") or value.count("/") != 1)
            values[key] = local if key != "vocoder_subfolder" and (os.path.exists(local) or path_like) else value
    return ModelSet(**values)


def resolve_model_set(spec: str = DEFAULT_MODEL_SET) -> ModelSet:
    """A built-in name, a model_set.json, or a folder holding one -> ModelSet (builds `tiny` if needed)."""
    check_model_set_spec(spec)
    if spec == DEFAULT_MODEL_SET:
        return SD15_AUFFUSION
    if spec == "tiny":
        return load_model_set_file(os.path.join(ensure_tiny(), MODEL_SET_FILE))
    return load_model_set_file(os.path.join(spec, MODEL_SET_FILE) if os.path.isdir(spec) else spec)


def _missing(component: str, model_id: str, exc: BaseException) -> ModelLoadError:
    from pws_batch.core.model_files import hub_offline

    offline = hub_offline()
    how = (f"download it where the hub is reachable (`hf download {model_id}`) into the Hugging Face cache "
           f"(HF_HOME) or a folder, and point the model set's '{component}' entry at that folder"
           if not os.path.exists(model_id) else "check that the folder holds the complete saved model")
    mode = " (HF_HUB_OFFLINE is set, so only local files are used)" if offline else ""
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if "Weights only load failed" in str(exc):  # torch's advice to retry with weights_only=False: unsafe here
        from pws_batch.core.model_files import weights_only_reason

        detail = (f"a weights file is not a valid torch checkpoint: torch.load(weights_only=True) cannot read it "
                  f"({weights_only_reason(exc)})")
        how += "; replace it with the published file (`pws-batch models check` names a truncated or damaged one)"
    return ModelLoadError(f"cannot load the {component} model {model_id!r}{mode}: {detail}. To fix: {how}; "
                          f"or use `--models tiny` for random offline weights")


def quiet_loading() -> None:
    """No per-file progress bars while loading weights (our own progress bar is the one that matters)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _safetensors_choice(model_id: str) -> bool | None:
    """False for a model found locally with .bin weights only (no failed attempt at safetensors first, no
    warning); otherwise None: diffusers then prefers safetensors and falls back to the .bin files."""
    from pws_batch.core.model_files import locate

    if (locate(model_id, "unet/diffusion_pytorch_model.safetensors") is None
            and locate(model_id, "unet/diffusion_pytorch_model.bin") is not None):
        return False
    return None


def load_diffusion_pipeline(component: str, model_id: str, device, dtype):
    """A Stable Diffusion-layout pipeline folder (SD 1.5 or Auffusion) via diffusers' from_pretrained."""
    from diffusers import StableDiffusionPipeline

    quiet_loading()
    try:
        # use_safetensors left unset: diffusers takes safetensors where a repo has them (SD 1.5) and otherwise
        # the .bin files (Auffusion publishes only those) through torch.load(weights_only=True), never a full
        # unpickle. The safety checker and feature extractor that SD 1.5's model_index.json names are not loaded.
        pipe = StableDiffusionPipeline.from_pretrained(
            model_id, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            use_safetensors=_safetensors_choice(model_id))
    except Exception as exc:  # noqa: BLE001 - diffusers raises OSError, ValueError, hub errors ...
        raise _missing(component, model_id, exc) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# stable-diffusion-v1-5's scheduler/scheduler_config.json (kept in reference_configs/sd15.json with its source):
# used to check schedules when the image model is not available locally (validating a manifest on a laptop),
# never to generate.
def _sd15_scheduler_config() -> dict:
    from pws_batch.core.model_files import reference_config

    return dict(reference_config("sd15")["scheduler"])


SD15_SCHEDULER_CONFIG = _sd15_scheduler_config()


def load_scheduler_config(model_id: str, fallback: bool = False) -> dict:
    """The image model's scheduler config (a small JSON, no weights); with `fallback`, SD 1.5's if missing."""
    from pws_batch.core.model_files import locate

    found = locate(model_id, "scheduler/scheduler_config.json")  # a folder or the HF cache: read without torch
    if found is not None:
        with open(found) as f:
            return json.load(f)
    if fallback:  # validating a manifest must not wait on the network
        return dict(SD15_SCHEDULER_CONFIG)
    from diffusers import DDIMScheduler

    try:
        return dict(DDIMScheduler.load_config(model_id, subfolder="scheduler"))
    except Exception as exc:  # noqa: BLE001
        raise _missing("image", model_id, exc) from exc


def load_scorer(component: str, model_id: str, device):
    """The CLIP or CLAP scorer (transformers' from_pretrained: safetensors, else .bin with weights_only)."""
    from pws_batch.core.scorers import ClapScorer, ClipScorer

    quiet_loading()
    try:
        return (ClipScorer if component == "clip" else ClapScorer)(model_id, device=device)
    except Exception as exc:  # noqa: BLE001
        raise _missing(component, model_id, exc) from exc


def load_vocoder(model_set: ModelSet, device, dtype):
    from pws_batch.core.vocoder import load_vocoder as _load

    try:
        return _load(model_set.vocoder, model_set.vocoder_subfolder, device=device, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise _missing("vocoder", model_set.vocoder, exc) from exc
