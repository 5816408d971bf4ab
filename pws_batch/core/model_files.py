"""The files each component of a model set reads: checked offline (`pws-batch models check`), fetched from the
hub (`pws-batch models fetch`).

Checking loads no weights and never touches the network: it looks for the files in a local folder or in the
Hugging Face cache (`huggingface_hub.try_to_load_from_cache`), reads the small JSON configs and the weights
files' headers (a safetensors header against the file's size, the zip directory of torch.save's format; no tensor
data), and reports one `Problem` per missing, damaged or inconsistent file. It checks what generation relies on:
both diffusion models work in SD 1.5's latent space (4 channels, VAE factor 8), each U-Net's cross-attention
takes its text encoder's width, and the vocoder reads Auffusion's mel format (256 mels, hop 160 at 16 kHz). The
facts come from the real configs kept in `reference_configs/` (each names its source).

No torch here: the Prefect flow (which has none) runs the same check before it starts Ray.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_configs")

# Each entry is one needed file; alternatives in a tuple, the preferred first (safetensors before .bin).
PIPELINE_FILES: tuple[tuple[str, ...], ...] = (
    ("model_index.json",),
    ("scheduler/scheduler_config.json",),
    ("unet/config.json",),
    ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
    ("vae/config.json",),
    ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"),
    ("text_encoder/config.json",),
    ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin"),
    ("tokenizer/tokenizer_config.json",),
    ("tokenizer/vocab.json", "tokenizer/tokenizer.json"),
    ("tokenizer/merges.txt", "tokenizer/tokenizer.json"),
)
TRANSFORMERS_FILES: tuple[tuple[str, ...], ...] = (
    ("config.json",),
    ("model.safetensors", "pytorch_model.bin"),
    ("preprocessor_config.json",),
    ("tokenizer_config.json",),
    ("vocab.json", "tokenizer.json"),
    ("merges.txt", "tokenizer.json"),
)
# Small files taken along when a repository has them (tokenizers read them when present).
OPTIONAL_FILES = ("tokenizer/special_tokens_map.json", "tokenizer/added_tokens.json", "special_tokens_map.json",
                  "added_tokens.json", "tokenizer.json", "processor_config.json")


def vocoder_files(subfolder: str) -> tuple[tuple[str, ...], ...]:
    prefix = f"{subfolder}/" if subfolder else ""
    return ((prefix + "config.json",), (prefix + "vocoder.pt",))


def component_files(component: str, vocoder_subfolder: str = "vocoder") -> tuple[tuple[str, ...], ...]:
    if component in ("image", "audio"):
        return PIPELINE_FILES
    if component == "vocoder":
        return vocoder_files(vocoder_subfolder)
    return TRANSFORMERS_FILES


@lru_cache(maxsize=None)
def reference_config(name: str) -> dict:
    """One of the real configs kept in the repository (`sd15`, `auffusion`, `clip_clap`)."""
    with open(os.path.join(REFERENCE_DIR, f"{name}.json")) as f:
        return json.load(f)


@dataclass(frozen=True)
class Problem:
    component: str
    model_id: str
    file: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.component} {self.model_id!r}: {self.file}: {self.message}; fix: {self.fix}"


def is_local(model_id: str) -> bool:
    """A folder path rather than a hub id ("org/name")."""
    return (os.path.isabs(model_id) or model_id.startswith((".", "~")) or os.path.exists(model_id)
            or model_id.count("/") != 1)


def locate(model_id: str, filename: str) -> str | None:
    """The local path of `filename` of a model: in its folder, or in the Hugging Face cache (no network)."""
    if is_local(model_id):
        path = os.path.join(os.path.expanduser(model_id), filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_id, filename)
    except Exception:  # noqa: BLE001 - a malformed id: not cached
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


@dataclass(frozen=True)
class SetOrigin:
    """Where a model set's files came from, as far as its model_set.json says: a tiny set's folder (rebuilt by
    `build-tiny`), and the hub id each component was fetched from (`models fetch --dir` records them)."""
    tiny_dir: str | None = None
    sources: tuple[tuple[str, str], ...] = ()

    def source(self, component: str) -> str | None:
        return dict(self.sources).get(component)


def set_origin(spec: str) -> SetOrigin:
    """The origin a model set records (nothing for the built-in hub set, or a file that cannot be read)."""
    from pws_batch.core.models import DEFAULT_MODEL_SET, MODEL_SET_FILE, tiny_dir

    if spec == "tiny":
        return SetOrigin(tiny_dir=tiny_dir())
    if spec == DEFAULT_MODEL_SET:
        return SetOrigin()
    path = os.path.join(spec, MODEL_SET_FILE) if os.path.isdir(spec) else spec
    entries, error = _read_json(path)
    if error:
        return SetOrigin()
    sources = entries.get("sources")
    return SetOrigin(tiny_dir=os.path.dirname(os.path.abspath(path)) if "tiny_version" in entries else None,
                     sources=tuple(sorted((str(k), str(v)) for k, v in sources.items()))
                     if isinstance(sources, dict) else ())


def _rebuild_tiny(spec: str, origin: SetOrigin) -> str | None:
    if spec == "tiny":
        return "rebuild the tiny set: `pws-batch models build-tiny`"
    if origin.tiny_dir:
        return f"rebuild the tiny set there: `pws-batch models build-tiny --dir {origin.tiny_dir}`"
    return None


def _fix_missing(component: str, model_id: str, spec: str, origin: SetOrigin = SetOrigin(),
                 files: tuple[str, ...] | None = None) -> str:
    """How to get a missing file (`files`: its alternatives) or, with files None, a missing folder / model.
    `models fetch` downloads hub ids only, so for a component that is a local folder the fix is to copy or
    download that component's files into the folder (from the hub id the set records, where it records one)."""
    if rebuild := _rebuild_tiny(spec, origin):
        return rebuild
    if not is_local(model_id):
        return (f"`pws-batch models fetch {spec}` where the hub is reachable (into the Hugging Face cache, HF_HOME), "
                f"or point the model set's '{component}' entry at a local folder")
    repo = origin.source(component)
    if files is None:
        if repo:
            return (f"download it again where the hub is reachable: set the model set's '{component}' entry to the "
                    f"hub id {repo} it was fetched from and run `pws-batch models fetch {spec}`")
        return (f"copy the complete model into {model_id} (from where it came from, or its hub repository: "
                f"`hf download REPO --local-dir {model_id}`), or point the model set's '{component}' entry at a "
                f"folder that has it, or at the model's hub id and run `pws-batch models fetch {spec}`")
    wanted = " ".join(files)
    if repo:
        return (f"download {'it' if len(files) == 1 else 'the one its repository publishes'} where the hub is "
                f"reachable: `hf download {repo} {wanted} --local-dir {model_id}`")
    return (f"copy {' or '.join(files)} of this model into {model_id} (from where the folder came from, or its hub "
            f"repository: `hf download REPO {wanted} --local-dir {model_id}`), or point the model set's "
            f"'{component}' entry at a folder that has it")


def _fix_damaged(component: str, model_id: str, spec: str, origin: SetOrigin, name: str) -> str:
    """How to replace a file that is there but damaged (the download is forced: a plain one keeps the file)."""
    if rebuild := _rebuild_tiny(spec, origin):
        return rebuild
    if not is_local(model_id):
        return (f"download it again where the hub is reachable: `hf download {model_id} {name} --force-download` "
                f"(`pws-batch models fetch` keeps a file already in the Hugging Face cache as it is)")
    if repo := origin.source(component):
        return (f"download it again where the hub is reachable: "
                f"`hf download {repo} {name} --local-dir {model_id} --force-download`")
    return (f"copy {name} into {model_id} again from where the folder came from, or download it from the model's "
            f"hub repository: `hf download REPO {name} --local-dir {model_id} --force-download`")


def _read_json(path: str) -> tuple[dict | None, str | None]:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as exc:
        return None, f"is not readable JSON ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return (value, None) if isinstance(value, dict) else (None, "is not a JSON object")


# ---------------------------------------------------------------------------------------------- weights files
# What a weights file must look like, read without its tensor data (a few bytes, the header, a zip's directory).
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers
_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                            "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# torch.save's legacy (pre-1.6, non-zip) format begins with this number, pickled.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def weights_problem(path: str) -> str | None:
    """What is wrong with a weights file (`.safetensors`, or torch.save's `.bin` / `.pt`), read without loading
    any tensor: None if it looks whole, else the problem in a few words."""
    if path.endswith(".safetensors"):
        return safetensors_problem(path)
    if path.endswith((".bin", ".pt", ".pth")):
        return torch_file_problem(path)
    return None


def safetensors_problem(path: str) -> str | None:
    """The documented safetensors layout: an 8-byte little-endian header length N, N bytes of JSON naming each
    tensor's dtype, shape and data_offsets (relative to the end of the header), then the data. The file must
    hold the header and reach the largest offset. (The safetensors library has no header-only read without
    a framework; this one needs none.)"""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else None
            raw = f.read(length) if length is not None and 0 < length <= min(size - 8, SAFETENSORS_MAX_HEADER) else b""
    except OSError as exc:
        return f"cannot be read ({type(exc).__name__}: {exc.strerror or exc})"
    if size == 0:
        return "empty (0 bytes)"
    if length is None:
        return f"truncated: {size} bytes, shorter than the 8-byte header length a safetensors file begins with"
    if length == 0 or length > SAFETENSORS_MAX_HEADER:
        return f"not a safetensors file: its first 8 bytes give a header length of {length}"
    if size < 8 + length:
        return f"truncated: {size} bytes, the header says at least {8 + length}"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return f"not a safetensors file: its header is not JSON ({type(exc).__name__})"
    if not isinstance(header, dict):
        return "not a safetensors file: its header is not a JSON object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] and isinstance(shape, list)
                and all(isinstance(d, int) and d >= 0 for d in shape)):
            return f"damaged header: tensor {name!r} has no valid shape and data_offsets"
        itemsize = _SAFETENSORS_DTYPE_BYTES.get(entry.get("dtype"))
        if itemsize is not None and math.prod(shape) * itemsize != offsets[1] - offsets[0]:
            return (f"damaged header: tensor {name!r} ({entry['dtype']} {shape}) takes "
                    f"{math.prod(shape) * itemsize} bytes, its data_offsets {offsets[1] - offsets[0]}")
        end = max(end, offsets[1])
    if size < 8 + length + end:
        return f"truncated: {size} bytes, the header says at least {8 + length + end}"
    return None


def torch_file_problem(path: str) -> str | None:
    """torch.save's zip format (torch >= 1.6): a zip archive whose central directory (at its end) reads and that
    holds a data.pkl; the legacy pickle format is recognised by its magic number (its data is not checked)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        return f"cannot be read ({type(exc).__name__}: {exc.strerror or exc})"
    if size == 0:
        return "empty (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            return (f"truncated or damaged: {size} bytes with no readable zip directory at its end (torch.save "
                    f"writes a zip archive; zipfile: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
        if not any(info.filename.endswith("data.pkl") for info in infos):
            return "not a torch checkpoint: a zip archive without the data.pkl torch.save writes"
        end = max((info.header_offset + info.compress_size for info in infos), default=0)
        if size < end:
            return f"truncated: {size} bytes, its zip directory says at least {end}"
        return None
    if head.startswith(b"\x80") and _legacy_torch_magic(head):
        return None
    return (f"not a valid torch checkpoint: neither torch.save's zip format nor its legacy pickle format "
            f"(it begins with {head[:8]!r})")


def _legacy_torch_magic(head: bytes) -> bool:
    """Whether the first pickled object in `head` (the file's first bytes) is torch's legacy magic number
    (unpickled from those bytes alone, with no classes allowed)."""
    import io
    import pickle

    class _NoClasses(pickle.Unpickler):
        def find_class(self, module, name):  # noqa: ARG002 - nothing but plain values
            raise pickle.UnpicklingError("no classes")

    try:
        return _NoClasses(io.BytesIO(head)).load() == _TORCH_LEGACY_MAGIC
    except Exception:  # noqa: BLE001 - anything unreadable is not that number
        return False


def weights_only_reason(exc: BaseException) -> str:
    """The reason in torch.load's error, without its advice to retry with weights_only=False."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line
             and "Weights only load failed" not in line]
    return lines[0].split(" Please ")[0] if lines else type(exc).__name__


def check_component(component: str, model_id: str, spec: str, vocoder_subfolder: str = "vocoder",
                    origin: SetOrigin | None = None) -> list[Problem]:
    """Every missing, damaged or inconsistent file of one component (offline, no weights loaded)."""
    origin = set_origin(spec) if origin is None else origin
    if is_local(model_id) and not os.path.isdir(os.path.expanduser(model_id)):
        return [Problem(component, model_id, "(folder)", "does not exist",
                        _fix_missing(component, model_id, spec, origin))]
    problems: list[Problem] = []
    configs: dict[str, dict] = {}
    for alternatives in component_files(component, vocoder_subfolder):
        found = next(((name, path) for name in alternatives if (path := locate(model_id, name))), None)
        if found is None:
            shown = " or ".join(alternatives)
            what = "is missing" if is_local(model_id) else "is not in the Hugging Face cache"
            problems.append(Problem(component, model_id, shown, what,
                                    _fix_missing(component, model_id, spec, origin, alternatives)))
            continue
        name, path = found
        if name.endswith(".json"):
            value, error = _read_json(path)
            if error:
                problems.append(Problem(component, model_id, name, error,
                                        _fix_damaged(component, model_id, spec, origin, name)))
            else:
                configs[name] = value
        elif error := weights_problem(path):
            problems.append(Problem(component, model_id, name, error,
                                    _fix_damaged(component, model_id, spec, origin, name)))
    needed = component_files(component, vocoder_subfolder)
    if len(problems) == len(needed) and not configs:  # nothing of it at all: one line, not one per file
        where = "in the folder" if is_local(model_id) else "in the Hugging Face cache"
        return [Problem(component, model_id, "(all files)", f"none of its {len(needed)} files is {where}",
                        _fix_missing(component, model_id, spec, origin))]
    problems += _check_configs(component, model_id, configs, vocoder_subfolder)
    return problems


def _check_configs(component: str, model_id: str, configs: dict[str, dict], vocoder_subfolder: str) -> list[Problem]:
    """The interfaces generation relies on, read from the configs found."""
    sd15 = reference_config("sd15")
    auffusion = reference_config("auffusion")
    problems = []

    def bad(file: str, message: str, fix: str) -> None:
        problems.append(Problem(component, model_id, file, message, fix))

    if component in ("image", "audio"):
        latent = sd15["unet"]["in_channels"]
        unet, vae, text = (configs.get(f"{p}/config.json") for p in ("unet", "vae", "text_encoder"))
        if unet is not None:
            for key in ("in_channels", "out_channels"):
                if unet.get(key) != latent:
                    bad("unet/config.json", f"{key} is {unet.get(key)}, not the {latent} latent channels of "
                        f"Stable Diffusion 1.5's latent space that both models share",
                        "use a U-Net trained in SD 1.5's latent space (an SD 1.5 fine-tune)")
        if vae is not None:
            if vae.get("latent_channels") != latent:
                bad("vae/config.json", f"latent_channels is {vae.get('latent_channels')}, not {latent}",
                    "use SD 1.5's VAE (or an SD 1.5 fine-tune's)")
            blocks = len(vae.get("block_out_channels") or ())
            if blocks != len(sd15["vae"]["block_out_channels"]):
                bad("vae/config.json", f"{blocks} blocks give a VAE factor of {2 ** max(blocks - 1, 0)}, not 8",
                    "use SD 1.5's VAE (or an SD 1.5 fine-tune's)")
        if unet is not None and text is not None and unet.get("cross_attention_dim") != text.get("hidden_size"):
            bad("unet/config.json", f"cross_attention_dim {unet.get('cross_attention_dim')} differs from the text "
                f"encoder's hidden_size {text.get('hidden_size')}", "use the U-Net and text encoder of one model")
    elif component == "vocoder":
        config = configs.get(f"{vocoder_subfolder}/config.json" if vocoder_subfolder else "config.json")
        facts = auffusion["vocoder"]
        if config is not None:
            file = f"{vocoder_subfolder}/config.json" if vocoder_subfolder else "config.json"
            missing = [k for k in facts["keys"] if k not in config]
            if missing:
                bad(file, f"lacks the HiFi-GAN keys {', '.join(missing)}", "use Auffusion's vocoder folder")
            elif config["num_mels"] != facts["num_mels"]:
                bad(file, f"num_mels is {config['num_mels']}, not the {facts['num_mels']} mels of Auffusion's "
                    f"spectrograms", "use Auffusion's vocoder")
            elif math.prod(config["upsample_rates"]) != facts["hop"]:
                bad(file, f"upsample_rates {config['upsample_rates']} give a hop of "
                    f"{math.prod(config['upsample_rates'])} samples, not {facts['hop']}", "use Auffusion's vocoder")
            elif config["sampling_rate"] != facts["sampling_rate"]:
                bad(file, f"sampling_rate is {config['sampling_rate']}, not {facts['sampling_rate']}",
                    "use Auffusion's vocoder")
    return problems


def needed_components(vocoder: str = "hifigan", scorers: bool = True) -> tuple[str, ...]:
    """What a command loads: generation needs image and audio (and the vocoder for HiFi-GAN), a run the scorers too."""
    return ("image", "audio", *(("vocoder",) if vocoder == "hifigan" else ()), *(("clip", "clap") if scorers else ()))


def check_model_set(model_set, spec: str, components: tuple[str, ...] | None = None) -> list[Problem]:
    """Every problem of a model set's components (all, or those named), offline and without loading weights."""
    problems = []
    origin = set_origin(spec)
    for component in components or ("image", "audio", "vocoder", "clip", "clap"):
        problems += check_component(component, getattr(model_set, component), spec, model_set.vocoder_subfolder,
                                    origin)
    return problems


def summary_line(problems: list[Problem], spec: str) -> str:
    """One line for a command that cannot start: the first problem, and how to see them all."""
    more = len(problems) - 1
    return (f"the model set {spec} is not complete: {problems[0]}"
            + (f" (and {more} more problem{'s' if more > 1 else ''}: `pws-batch models check {spec}` lists them)"
               if more else ""))


def require_model_files(spec: str, vocoder: str = "hifigan", scorers: bool = True):
    """The model set `spec` names, once every file that `generate` (scorers=False) or a run's actors will load is
    there (offline, no weights loaded); else ModelSetError in one line."""
    from pws_batch.core.models import ModelSetError, resolve_model_set

    model_set = resolve_model_set(spec)
    problems = check_model_set(model_set, spec, needed_components(vocoder, scorers))
    if problems:
        raise ModelSetError(summary_line(problems, spec))
    return model_set


# ---------------------------------------------------------------------------------------------- fetching
class FetchError(RuntimeError):
    """A set that could not be fetched: one line with the reason and what to do."""


def choose_files(component: str, repo_files: list[str], vocoder_subfolder: str = "vocoder") -> list[str]:
    """The files of a repository that a component reads: safetensors where published, else the .bin; no
    .ckpt, no non-EMA or fp16 variants, no safety checker, no other frameworks' weights. Raises FetchError if
    the repository lacks a needed file."""
    present = set(repo_files)
    chosen = []
    for alternatives in component_files(component, vocoder_subfolder):
        name = next((n for n in alternatives if n in present), None)
        if name is None:
            raise FetchError(f"the repository has none of {' / '.join(alternatives)}, which the {component} "
                             f"model needs; is it the right repository?")
        chosen.append(name)
    if component in ("image", "audio", "clip", "clap"):
        chosen += [n for n in OPTIONAL_FILES if n in present]
    return sorted(set(chosen))


def fetch_plan(model_set, repo_files: Callable[[str], list[str]]) -> dict[str, list[str]]:
    """hub id -> the files to download, for every component of the set that is a hub id (local folders are skipped)."""
    plan: dict[str, set[str]] = {}
    for component in ("image", "audio", "vocoder", "clip", "clap"):
        model_id = getattr(model_set, component)
        if is_local(model_id):
            continue
        files = choose_files(component, repo_files(model_id), model_set.vocoder_subfolder)
        plan.setdefault(model_id, set()).update(files)
    return {repo: sorted(files) for repo, files in plan.items()}


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (the Hugging Face libraries' truthy spellings)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def fetch_model_set(model_set, spec: str, local_dir: str | None = None, say: Callable[[str], None] = print) -> str | None:
    """Download what each component needs with `snapshot_download` (resumable, with progress bars), into the
    Hugging Face cache or, with `local_dir`, one folder per repository plus a model_set.json pointing at them.
    Returns that model_set.json's path (or None for the cache)."""
    if hub_offline():
        raise FetchError("HF_HUB_OFFLINE is set, so nothing can be downloaded; run `pws-batch models fetch` "
                         "without it on a machine that reaches huggingface.co, then run offline")
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()

    def listing(repo: str) -> list[str]:
        try:
            return api.list_repo_files(repo)
        except Exception as exc:  # noqa: BLE001 - hub / network errors of many kinds
            raise FetchError(_hub_error(repo, exc)) from exc

    plan = fetch_plan(model_set, listing)
    for component in ("image", "audio", "vocoder", "clip", "clap"):
        if is_local(model_id := getattr(model_set, component)):
            say(f"skipping {component}: {model_id} is a local folder (fetch downloads hub ids; `pws-batch models "
                f"check` says what a folder lacks and where to get it)")
    if local_dir:
        os.makedirs(local_dir, exist_ok=True)
    folders: dict[str, str] = {}
    for repo, files in plan.items():
        target = os.path.join(local_dir, repo.split("/")[-1]) if local_dir else None
        say(f"fetching {repo}: {len(files)} files ({', '.join(f for f in files if not f.endswith('.json'))})"
            + (f" into {target}" if target else " into the Hugging Face cache"))
        try:
            folders[repo] = snapshot_download(repo, allow_patterns=files, local_dir=target)
        except Exception as exc:  # noqa: BLE001
            raise FetchError(_hub_error(repo, exc) + "; run the same command again to resume") from exc
    if not local_dir:
        return None
    entries: dict = {"name": f"{model_set.name}-local"}
    sources = dict(set_origin(spec).sources)  # a fetched set fetched again keeps what its folders came from
    for component in ("image", "audio", "vocoder", "clip", "clap"):
        model_id = getattr(model_set, component)
        entries[component] = os.path.relpath(folders[model_id], local_dir) if model_id in folders else model_id
        if model_id in folders:
            sources[component] = model_id
    entries["vocoder_subfolder"] = model_set.vocoder_subfolder
    if sources:  # so that `models check` can say which repository a damaged file is downloaded from again
        entries["sources"] = {c: sources[c] for c in ("image", "audio", "vocoder", "clip", "clap") if c in sources}
    path = os.path.join(local_dir, "model_set.json")
    with open(path, "w") as f:
        json.dump(entries, f, indent=2)
    return path


def _hub_error(repo: str, exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"cannot fetch {repo} from the Hugging Face hub: {type(exc).__name__}: {first}"
