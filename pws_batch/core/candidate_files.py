"""Writing one pair's candidates as files: candidate-NNN.png / .wav and candidates.json (fsspec, any URI)."""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
from typing import Any

from pws_batch import __version__
from pws_batch.core.device import dtype_name
from pws_batch.core.media import png_bytes, wav_bytes

# The names write_generation writes: only these are ever replaced (`generate --overwrite`).
GENERATED = re.compile(r"^(candidates\.json|candidate-\d{3,}\.(png|wav))$")


def existing_entries(out: str) -> tuple[list[str], list[str]]:
    """What the folder `out` already holds: (the files an earlier generate wrote, every other entry), each
    sorted; ([], []) for a new or empty folder. A folder named like one of our files counts as another entry."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out.rstrip("/"))
    if not fs.exists(root) or not fs.isdir(root):
        return [], []
    ours, others = [], []
    for entry in fs.ls(root, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        (ours if entry.get("type") == "file" and GENERATED.match(name) else others).append(name)
    return sorted(ours), sorted(others)


def remove_earlier(out: str) -> list[str]:
    """Delete the files an earlier generate wrote to `out` (nothing else); returns their names."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out.rstrip("/"))
    ours, _ = existing_entries(out)
    for name in ours:
        fs.rm(f"{root}/{name}")
    return ours


def generation_record(result, pipe, **extra: Any) -> dict[str, Any]:
    """Everything needed to understand and regenerate a result: parameters, seeds, models, counts, timings."""
    evals = dict(result.unet_evals)
    total = sum(evals.values())
    n = max(len(result.candidates), 1)
    return {
        "pws_batch_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "params": result.params.to_dict(),
        "effective_image_prompt": result.params.effective_image_prompt,
        "models": pipe.model_set.to_dict(),
        "device": str(pipe.device),
        "dtype": dtype_name(pipe.dtype),
        "host": platform.node(),
        **extra,
        "unet_evals": {**evals, "total": total, "minimum": result.unet_evals_minimum,
                       "per_candidate": total / n, "minimum_per_candidate": result.unet_evals_minimum / n},
        "timings": result.timings,
    }


def write_generation(out: str, result, pipe, **extra: Any) -> str:
    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    entries = []
    for c in result.candidates:
        stem = f"candidate-{c.index:03d}"
        with fs.open(f"{root}/{stem}.png", "wb") as f:
            f.write(png_bytes(c.image))
        with fs.open(f"{root}/{stem}.wav", "wb") as f:
            f.write(wav_bytes(c.audio))
        entries.append({"index": c.index, "seed": c.seed, "image": f"{stem}.png", "audio": f"{stem}.wav",
                        "image_size": list(c.image.shape[::-1]), "audio_samples": int(c.audio.shape[0])})
    record = generation_record(result, pipe, **extra)
    record["candidates"] = entries
    with fs.open(f"{root}/candidates.json", "w") as f:
        json.dump(record, f, indent=2)
    return out
