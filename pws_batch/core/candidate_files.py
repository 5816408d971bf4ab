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

# The names CandidateFolder writes: only these are ever replaced (`generate --overwrite`).
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


class CandidateFolder:
    """One pair's candidates written into the folder `out` as they are made: each micro-batch's
    candidate-NNN.png / .wav at once (`add`, so that an interrupted run keeps them), candidates.json once all are
    made (`finish`). With `replace_earlier`, an earlier generate's files (only those) are deleted just before the
    first new file is written: a run that fails before that leaves them as they were."""

    def __init__(self, out: str, replace_earlier: bool = False):
        import fsspec

        self.out = out
        self.fs, self.root = fsspec.core.url_to_fs(out)
        self.replace_earlier = replace_earlier
        self.written: list[int] = []  # indices of the candidates whose files are written

    def add(self, candidates) -> None:
        if self.replace_earlier:
            remove_earlier(self.out)
            self.replace_earlier = False
        self.fs.makedirs(self.root, exist_ok=True)
        for c in candidates:
            stem = f"candidate-{c.index:03d}"
            files = {f"{self.root}/{stem}.png": png_bytes(c.image), f"{self.root}/{stem}.wav": wav_bytes(c.audio)}
            try:
                for path, data in files.items():
                    with self.fs.open(path, "wb") as f:
                        f.write(data)
            except BaseException:  # Ctrl-C mid-write: leave no cut-off file, only whole candidates
                for path in files:
                    try:
                        self.fs.rm(path)
                    except Exception:  # noqa: BLE001 - not written yet
                        pass
                raise
            self.written.append(c.index)

    def finish(self, result, pipe, **extra: Any) -> str:
        """Write candidates.json (and the files of any candidate not `add`ed yet); returns `out`."""
        done = set(self.written)
        missing = [c for c in result.candidates if c.index not in done]
        if missing or not self.written:
            self.add(missing)
        entries = [{"index": c.index, "seed": c.seed, "image": f"candidate-{c.index:03d}.png",
                    "audio": f"candidate-{c.index:03d}.wav", "image_size": list(c.image.shape[::-1]),
                    "audio_samples": int(c.audio.shape[0])} for c in result.candidates]
        record = generation_record(result, pipe, **extra)
        record["candidates"] = entries
        with self.fs.open(f"{self.root}/candidates.json", "w") as f:
            json.dump(record, f, indent=2)
        return self.out
