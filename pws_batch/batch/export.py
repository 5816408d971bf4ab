"""`pws-batch export OUT DIR --format files`: the dataset as a folder of files, img2dataset-style, and
`pws-batch push OUT REPO_ID`: the dataset to the Hugging Face Hub.

    DIR/00000.png   the picture
    DIR/00000.wav   the sound (.flac for a run made with --audio-format flac)
    DIR/00000.json  every other column of the row (prompts, parameters, seeds, scores, ...)

Rows are numbered in the order of the data parts; one part's media are in memory at a time.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from pws_batch.batch.dataset import Output, check_intact, inside_own_folders, read_run_json, same_place
from pws_batch.batch.schema import MEDIA_COLUMNS, media_extension
from pws_batch.core.model_files import hub_offline

# What `push` uploads: the dataset, its card and its records, not the gallery or the commit markers.
PUSH_PATTERNS = ["README.md", "card/*.png", "data/*.parquet", "candidates/*.parquet", "rejected.parquet", "run.json"]


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        import base64

        return base64.b64encode(bytes(value)).decode()
    return str(value)


EXPORTED = re.compile(r"^\d{5,}\.(png|wav|flac|json)$")  # the names export_files writes


class ExportError(ValueError):
    """The destination holds an earlier export (the message says how to go on)."""


def export_files(uri: str, dest: str, overwrite: bool = False) -> int:
    """Write every kept row of the dataset at `uri` as NNNNN.png / .wav|.flac / .json into `dest`; returns the
    number of rows. A `dest` that already holds files named so is refused (its rows would mix with this export's)
    unless `overwrite`, which deletes those files first; other files in `dest` are left alone."""
    out = Output(uri)
    if not out.exists("run.json"):
        raise FileNotFoundError(f"{uri} holds no run.json: not a pws-batch dataset (or the run never started)")
    target = Output(dest)
    root, path = same_place(out.uri, dest)
    if root is not None and root == path:
        raise ExportError(f"{dest} is the dataset's own folder: its rows would lie among its parts; export to "
                          f"another folder (e.g. {uri.rstrip('/')}/files)")
    if folder := inside_own_folders(out, dest):
        raise ExportError(f"{dest} is inside the dataset's {folder}/ folder, which its "
                          f"readers read whole; export to another folder (e.g. {uri.rstrip('/')}/files)")
    read_run_json(out)  # DatasetError (one line) when it is cut off
    check_intact(out)  # before anything is written: a damaged part failed midway or dropped its rows silently
    earlier = [name for name in target.list("") if EXPORTED.match(name)]
    if earlier and not overwrite:
        raise ExportError(f"{dest} already holds {len(earlier)} exported files ({earlier[0]}, ...): their rows "
                          f"would mix with this export's. Export to an empty or new folder, or pass --overwrite "
                          f"to delete them first")
    for name in earlier:
        target.fs.rm(target.path(name))
    n = 0
    for part in [p for p in out.list("data") if p.endswith(".parquet")]:
        for row in out.read_table(f"data/{part}").to_pylist():
            stem = f"{n:05d}"
            image, audio = row.get("image") or {}, row.get("audio") or {}
            if image.get("bytes") is not None:
                target.write_bytes(f"{stem}.{media_extension(image, 'png')}", image["bytes"])
            if audio.get("bytes") is not None:
                target.write_bytes(f"{stem}.{media_extension(audio, 'wav')}", audio["bytes"])
            record = {k: v for k, v in row.items() if k not in MEDIA_COLUMNS}
            target.write_bytes(f"{stem}.json", json.dumps(record, default=_json_default, ensure_ascii=False,
                                                          indent=1).encode())
            n += 1
    return n


def push_files(uri: str) -> list[str]:
    """The files `push` uploads, relative to the dataset's folder."""
    import fnmatch

    out = Output(uri)
    found = []
    for path in out.fs.find(out.root):
        rel = path[len(out.root.rstrip("/")) + 1:]
        if any(fnmatch.fnmatch(rel, pattern) and rel.count("/") == pattern.count("/") for pattern in PUSH_PATTERNS):
            found.append(rel)
    return sorted(found)


def push(uri: str, repo_id: str, private: bool = False) -> str:
    """Upload a local dataset folder to the Hub as a dataset repository (needs the network and a token)."""
    import os

    from huggingface_hub import HfApi

    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"push uploads a local folder; copy {uri} to a local path first")
    folder = uri[len("file://"):] if uri.startswith("file://") else uri
    if not os.path.exists(os.path.join(folder, "run.json")):
        raise FileNotFoundError(f"{uri} holds no run.json: not a pws-batch dataset (or the run never started)")
    if hub_offline():
        raise ConnectionError("HF_HUB_OFFLINE is set: pushing needs the network; unset it and log in "
                              "(`hf auth login`) first")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_large_folder(repo_id=repo_id, folder_path=folder, repo_type="dataset",
                                allow_patterns=PUSH_PATTERNS)
    except Exception as exc:  # noqa: BLE001 - the two failures a user meets first, said as such
        raise _hub_failure(exc) from exc
    return f"https://huggingface.co/datasets/{repo_id}"


def _hub_failure(exc: Exception) -> Exception:
    """A missing or refused token, or no route to the Hub, as a ConnectionError saying which and what to do;
    anything else as it is."""
    import socket

    name, text = type(exc).__name__, " ".join(str(exc).split())[:300]
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if "Token" in name or status in (401, 403):
        return ConnectionError(f"the Hugging Face Hub refused the upload ({name}: {text}): log in with a token "
                               f"that may write there (`hf auth login`, or set HF_TOKEN)")
    if status is not None:  # it answered: say what
        return ConnectionError(f"the Hugging Face Hub answered {status} ({name}: {text})")
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)) \
            or any(k in name for k in ("ConnectError", "Timeout", "NetworkError")):
        return ConnectionError(f"cannot reach the Hugging Face Hub ({name}: {text}); check the network (and "
                               f"HF_ENDPOINT, if you use a mirror)")
    return exc  # a local file that cannot be read, say: as it is
