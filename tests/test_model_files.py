"""Model files as the hub publishes them: the tiny set in the real formats and interfaces (checked against the
real configs kept in pws_batch/core/reference_configs), `models check` and `models fetch` offline, fail-fast
commands, load failures inside actors as one line, and a set laid out exactly as in the Hugging Face cache."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from pws_batch.cli import main
from pws_batch.core.model_files import (FetchError, check_model_set, choose_files, fetch_plan, reference_config)
from pws_batch.core.models import SD15_AUFFUSION, resolve_model_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _json(*parts) -> dict:
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def _files(folder) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}


# ---------------------------------------------------------------------------------------------- the facts
@pytest.mark.parametrize("component, facts", [("image", "sd15"), ("audio", "auffusion")])
def test_tiny_diffusion_folders_keep_the_real_interfaces_and_formats(tiny_models, component, facts):
    real, sd15 = reference_config(facts), reference_config("sd15")
    folder = os.path.join(tiny_models, component)
    unet, vae = _json(folder, "unet", "config.json"), _json(folder, "vae", "config.json")
    text = _json(folder, "text_encoder", "config.json")
    # The interfaces generation relies on: the shared latent space, the cross-attention width, the text window.
    assert unet["in_channels"] == unet["out_channels"] == real["unet"]["in_channels"] == 4
    assert unet["cross_attention_dim"] == real["unet"]["cross_attention_dim"] == text["hidden_size"] == 768
    assert vae["latent_channels"] == 4 and len(vae["block_out_channels"]) == len(sd15["vae"]["block_out_channels"])
    assert vae["scaling_factor"] == sd15["vae"]["scaling_factor"] == 0.18215
    assert text["max_position_embeddings"] == real["text_encoder"]["max_position_embeddings"] == 77
    assert _json(folder, "tokenizer", "tokenizer_config.json")["model_max_length"] == 77
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(os.path.join(folder, "tokenizer")))
    scheduler = _json(folder, "scheduler", "scheduler_config.json")
    assert {k: scheduler.get(k) for k in sd15["scheduler"]} == sd15["scheduler"]
    # Block kinds are the real ones (the tiny U-Net attends only at its lowest resolution, for speed).
    assert set(unet["down_block_types"]) <= set(sd15["unet"]["down_block_types"])
    assert set(unet["up_block_types"]) <= set(sd15["unet"]["up_block_types"])
    assert vae["down_block_types"] == sd15["vae"]["down_block_types"]
    # The file formats the real repository publishes, and its model_index.json entries.
    files = _files(folder)
    assert set(real["weights"].values()) <= files
    index = _json(folder, "model_index.json")
    assert {k: index.get(k) for k in real["model_index"]} == real["model_index"]
    if component == "audio":  # Auffusion: pickle-format .bin only
        assert not any(f.endswith(".safetensors") for f in files)


def test_tiny_vocoder_clip_and_clap_keep_the_real_interfaces(tiny_models):
    facts = reference_config("auffusion")["vocoder"]
    vocoder = _json(tiny_models, "audio", "vocoder", "config.json")
    assert set(facts["keys"]) <= set(vocoder) and vocoder["num_mels"] == facts["num_mels"] == 256
    assert math.prod(vocoder["upsample_rates"]) == facts["hop"] == 160 and vocoder["sampling_rate"] == 16000
    real = reference_config("clip_clap")
    clip, clap = _json(tiny_models, "clip", "config.json"), _json(tiny_models, "clap", "config.json")
    assert clip["text_config"]["max_position_embeddings"] == real["clip"]["text_max_position_embeddings"]
    assert _json(tiny_models, "clip", "tokenizer_config.json")["model_max_length"] == real["clip"]["tokenizer_model_max_length"]
    assert _json(tiny_models, "clip", "preprocessor_config.json")["crop_size"]["height"] == real["clip"]["image_size"]
    assert clap["text_config"]["max_position_embeddings"] == real["clap"]["text_max_position_embeddings"] == 514
    assert _json(tiny_models, "clap", "tokenizer_config.json")["model_max_length"] == real["clap"]["tokenizer_model_max_length"]
    extractor = _json(tiny_models, "clap", "preprocessor_config.json")
    assert extractor["sampling_rate"] == real["clap"]["sampling_rate"] and extractor["max_length_s"] == real["clap"]["max_length_s"]
    assert "clip/model.safetensors" in _files(tiny_models) and "clap/pytorch_model.bin" in _files(tiny_models)


def test_the_tiny_bin_folder_loads_through_the_default_code_path_and_generates(tiny_pipeline):
    """Auffusion's layout (.bin only) through load_diffusion_pipeline: the fixture loaded it; it generates."""
    from pws_batch.core.params import GenerationParams

    audio_folder = tiny_pipeline.model_set.audio
    assert not any(f.endswith(".safetensors") for f in _files(audio_folder))
    assert tiny_pipeline.audio_pipe.text_encoder.config.hidden_size == 768
    result = tiny_pipeline(GenerationParams("dogs", "barking", steps=2, num_candidates=1))
    audio = result.candidates[0].audio
    assert audio.shape == (992 * 160,) and abs(audio).max() > 0
    assert result.unet_evals["audio"] > 0


# ---------------------------------------------------------------------------------------------- models check
def test_models_check_passes_the_tiny_set(tiny_models, capsys):
    assert main(["models", "check", tiny_models]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"model set {tiny_models}: complete (image, audio, vocoder, clip, clap: every file there, "
                   f"interfaces agree)"]


def test_models_check_names_each_broken_file_of_a_damaged_copy(tiny_models, tmp_path, capsys):
    copy = tmp_path / "set"
    shutil.copytree(tiny_models, copy)
    os.remove(copy / "audio" / "unet" / "diffusion_pytorch_model.bin")
    vae = _json(copy, "image", "vae", "config.json")
    (copy / "image" / "vae" / "config.json").write_text(json.dumps({**vae, "latent_channels": 8}))
    vocoder = _json(copy, "audio", "vocoder", "config.json")
    (copy / "audio" / "vocoder" / "config.json").write_text(json.dumps({**vocoder, "upsample_rates": [5, 4, 2, 2]}))
    (copy / "clip" / "config.json").write_text("{not json")
    os.remove(copy / "clap" / "preprocessor_config.json")
    assert main(["models", "check", str(copy)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"model set {copy}: 5 problems"
    expected = [
        ("image", "vae/config.json", "latent_channels is 8, not 4"),
        ("audio", "unet/diffusion_pytorch_model.safetensors or unet/diffusion_pytorch_model.bin", "is missing"),
        ("vocoder", "vocoder/config.json", "give a hop of 80 samples, not 160"),
        ("clip", "config.json", "is not readable JSON"),
        ("clap", "preprocessor_config.json", "is missing"),
    ]
    assert len(lines) == len(expected) + 1
    for line, (component, file, message) in zip(lines, expected):
        assert line.startswith(f"{component} '{copy / component if component != 'vocoder' else copy / 'audio'}': "
                               f"{file}: "), line
        assert message in line and "; fix: " in line



def _truncate(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _safetensors_sizes(path) -> tuple[int, int]:
    """A safetensors file's 8 + header length (what a file cut inside its header must at least have), and that
    plus the largest data_offsets end (its whole size)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return 8 + length, 8 + length + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")


# (component, file in the set folder, damage, the file as the check names it, what the line says)
DAMAGED = [
    ("image", "image/unet/diffusion_pytorch_model.safetensors", lambda p: _truncate(p, 100),
     "unet/diffusion_pytorch_model.safetensors", "truncated: 100 bytes, the header says at least "),
    ("image", "image/vae/diffusion_pytorch_model.safetensors", lambda p: _truncate(p, os.path.getsize(p) - 1),
     "vae/diffusion_pytorch_model.safetensors", "truncated: "),
    ("clip", "clip/model.safetensors", lambda p: _truncate(p, 0), "model.safetensors", "empty (0 bytes)"),
    ("clip", "clip/model.safetensors", lambda p: p.write_bytes(b"not safetensors"), "model.safetensors",
     "not a safetensors file"),
    ("vocoder", "audio/vocoder/vocoder.pt", lambda p: p.write_text("garbage"), "vocoder/vocoder.pt",
     "not a valid torch checkpoint"),
    ("audio", "audio/unet/diffusion_pytorch_model.bin", lambda p: _truncate(p, os.path.getsize(p) // 2),
     "unet/diffusion_pytorch_model.bin", "truncated or damaged: "),
    ("clap", "clap/pytorch_model.bin", lambda p: _truncate(p, 100), "pytorch_model.bin", "truncated or damaged: 100 bytes"),
]


@pytest.mark.parametrize("component, damaged, damage, file, message", DAMAGED,
                         ids=[f"{d[1]}:{d[4].split(':')[0]}" for d in DAMAGED])
def test_models_check_names_a_damaged_weights_file(tiny_models, tmp_path, capsys, component, damaged, damage, file,
                                                   message):
    """A truncated, empty or garbage weights file fails the check (headers and zip directories only, no tensor
    read), one line naming the file, instead of passing and failing at model load."""
    copy = tmp_path / "set"
    shutil.copytree(tiny_models, copy)
    path = copy / damaged
    sizes = _safetensors_sizes(path) if damaged.endswith(".safetensors") else None
    damage(path)
    assert main(["models", "check", str(copy)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"model set {copy}: 1 problem", lines
    folder = copy / ("audio" if component == "vocoder" else component)
    assert lines[0].startswith(f"{component} '{folder}': {file}: {message}"), lines[0]
    if sizes and message.startswith("truncated"):  # the size the header asks for: of the header alone if it is cut off
        needed = sizes[0] if os.path.getsize(path) < sizes[0] else sizes[1]
        assert f"truncated: {os.path.getsize(path)} bytes, the header says at least {needed};" in lines[0]
    assert "; fix: " in lines[0]


def test_models_check_takes_torch_legacy_pickle_format(tiny_models, tmp_path, capsys):
    """A .bin written by torch.save's legacy (non-zip) format, which older repositories publish, still passes."""
    import torch

    copy = tmp_path / "set"
    shutil.copytree(tiny_models, copy)
    path = copy / "clap" / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert not path.read_bytes().startswith(b"PK")
    assert main(["models", "check", str(copy)]) == 0, capsys.readouterr().out


def test_models_check_of_hub_ids_looks_only_in_the_cache(capsys):
    assert main(["models", "check", "sd15-auffusion"]) == 1  # the test cache holds none of them
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and lines[-1] == "model set sd15-auffusion: 5 problems"
    assert lines[0].startswith("image 'stable-diffusion-v1-5/stable-diffusion-v1-5': (all files): none of its")
    assert "`pws-batch models fetch sd15-auffusion`" in lines[0]


# ---------------------------------------------------------------------------------------------- models fetch
SD15_REPO = [
    ".gitattributes", "README.md", "model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors", "feature_extractor/preprocessor_config.json", "safety_checker/config.json",
    "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
    "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
]
AUFFUSION_REPO = [
    ".gitattributes", "README.md", "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/pytorch_model.bin", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.bin", "vocoder/config.json", "vocoder/vocoder.pt",
]
CLIP_REPO = ["config.json", "flax_model.msgpack", "merges.txt", "model.safetensors", "preprocessor_config.json",
             "pytorch_model.bin", "special_tokens_map.json", "tf_model.h5", "tokenizer.json", "tokenizer_config.json",
             "vocab.json"]
CLAP_REPO = ["config.json", "merges.txt", "preprocessor_config.json", "pytorch_model.bin", "special_tokens_map.json",
             "tokenizer.json", "tokenizer_config.json", "vocab.json"]


def test_fetch_takes_only_the_files_each_component_reads():
    listings = {SD15_AUFFUSION.image: SD15_REPO, SD15_AUFFUSION.audio: AUFFUSION_REPO,
                SD15_AUFFUSION.clip: CLIP_REPO, SD15_AUFFUSION.clap: CLAP_REPO}
    plan = fetch_plan(SD15_AUFFUSION, listings.__getitem__)
    assert set(plan) == set(listings)
    sd15 = plan[SD15_AUFFUSION.image]
    assert "unet/diffusion_pytorch_model.safetensors" in sd15 and "text_encoder/model.safetensors" in sd15
    everything = [f for files in plan.values() for f in files]
    for bad in (".ckpt", "non_ema", ".fp16.", "safety_checker", "feature_extractor", ".h5", ".msgpack", "README"):
        assert not any(bad in f for f in everything), bad
    assert not any(f.endswith(".bin") for f in sd15)  # safetensors where published
    assert plan[SD15_AUFFUSION.audio] == sorted(f for f in AUFFUSION_REPO if f not in (".gitattributes", "README.md"))
    assert "model.safetensors" in plan[SD15_AUFFUSION.clip] and "pytorch_model.bin" not in plan[SD15_AUFFUSION.clip]
    assert "pytorch_model.bin" in plan[SD15_AUFFUSION.clap]
    with pytest.raises(FetchError, match="none of unet/diffusion_pytorch_model.safetensors / "):
        choose_files("audio", [f for f in AUFFUSION_REPO if not f.startswith("unet/diffusion")])


def test_fetch_offline_says_so_in_one_line(capsys):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert main(["models", "fetch", "sd15-auffusion"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE is set" in err


def _fake_hub_cache(hf_home, tiny_models) -> None:
    """The tiny folders laid out exactly as huggingface_hub caches the real repositories of sd15-auffusion."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    for repo, folder in ((SD15_AUFFUSION.image, "image"), (SD15_AUFFUSION.audio, "audio"),
                         (SD15_AUFFUSION.clip, "clip"), (SD15_AUFFUSION.clap, "clap")):
        root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
        shutil.copytree(os.path.join(tiny_models, folder), root / "snapshots" / revision)
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text(revision)


@pytest.mark.slow
def test_a_set_laid_out_as_the_hub_publishes_it_checks_and_generates(tiny_models, tmp_path):
    """`--models sd15-auffusion` (the real hub ids), with tiny weights in the Hugging Face cache, offline."""
    hf_home = tmp_path / "hf"
    _fake_hub_cache(hf_home, tiny_models)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    check = subprocess.run([sys.executable, "-m", "pws_batch.cli", "models", "check"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "model set sd15-auffusion: complete" in check.stdout
    out = tmp_path / "o"
    gen = subprocess.run([sys.executable, "-m", "pws_batch.cli", "generate", "--image-prompt", "dogs",
                          "--audio-prompt", "barking", "--steps", "2", "--device", "cpu", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0, gen.stderr[-3000:]
    written = json.loads((out / "candidates.json").read_text())
    assert written["models"]["audio"] == "auffusion/auffusion-full-no-adapter"
    assert (out / "candidate-000.wav").stat().st_size > 100_000



def _fake_hub(monkeypatch, tiny_models) -> None:
    """huggingface_hub as `models fetch` uses it, answered from the tiny folders under the real repositories'
    names and file lists (no network)."""
    import huggingface_hub

    listings = {SD15_AUFFUSION.image: SD15_REPO, SD15_AUFFUSION.audio: AUFFUSION_REPO,
                SD15_AUFFUSION.clip: CLIP_REPO, SD15_AUFFUSION.clap: CLAP_REPO}
    folders = {SD15_AUFFUSION.image: "image", SD15_AUFFUSION.audio: "audio", SD15_AUFFUSION.clip: "clip",
               SD15_AUFFUSION.clap: "clap"}

    class Api:
        def list_repo_files(self, repo):
            return listings[repo]

    def snapshot_download(repo, allow_patterns, local_dir):
        for name in allow_patterns:
            source = os.path.join(tiny_models, folders[repo], name)
            if os.path.isfile(source):
                os.makedirs(os.path.dirname(os.path.join(local_dir, name)), exist_ok=True)
                shutil.copy(source, os.path.join(local_dir, name))
        return local_dir

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_fetch_dir_creates_the_folder_and_check_names_the_repository_to_download_from(tiny_models, tmp_path,
                                                                                      monkeypatch, capsys):
    """`models fetch SET --dir D` into a new D records where each folder came from; a file later damaged or lost
    there is then fixed from that repository, not by `fetch` (which downloads hub ids, not into folders)."""
    _fake_hub(monkeypatch, tiny_models)
    target = tmp_path / "new" / "models"
    assert main(["models", "fetch", "sd15-auffusion", "--dir", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {target / 'model_set.json'}" in out and "model set " in out and ": complete (" in out
    written = _json(target, "model_set.json")
    assert written["sources"] == {"image": SD15_AUFFUSION.image, "audio": SD15_AUFFUSION.audio,
                                  "vocoder": SD15_AUFFUSION.vocoder, "clip": SD15_AUFFUSION.clip,
                                  "clap": SD15_AUFFUSION.clap}
    audio, clip = target / "auffusion-full-no-adapter", target / "clip-vit-base-patch16"
    (audio / "vocoder" / "vocoder.pt").write_text("garbage")
    os.remove(clip / "preprocessor_config.json")
    _truncate(clip / "model.safetensors", 100)
    assert main(["models", "check", str(target)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        f"vocoder '{audio}': vocoder/vocoder.pt: not a valid torch checkpoint: neither torch.save's zip format nor "
        f"its legacy pickle format (it begins with b'garbage'); fix: download it again where the hub is reachable: "
        f"`hf download {SD15_AUFFUSION.vocoder} vocoder/vocoder.pt --local-dir {audio} --force-download`",
        lines[1],
        f"clip '{clip}': preprocessor_config.json: is missing; fix: download it where the hub is reachable: "
        f"`hf download {SD15_AUFFUSION.clip} preprocessor_config.json --local-dir {clip}`",
        f"model set {target}: 3 problems"]
    assert lines[1].startswith(f"clip '{clip}': model.safetensors: truncated: 100 bytes, the header says at least ")
    assert lines[1].endswith(f"`hf download {SD15_AUFFUSION.clip} model.safetensors --local-dir {clip} "
                             f"--force-download`")
    assert "models fetch" not in "\n".join(lines)


def test_fetch_dir_of_local_folders_makes_the_folder_and_says_what_it_skips(tiny_models, tmp_path, monkeypatch,
                                                                            capsys):
    """With nothing to download, a new --dir was never made and writing its model_set.json raised FileNotFoundError."""
    _fake_hub(monkeypatch, tiny_models)
    target = tmp_path / "not-yet"
    assert main(["models", "fetch", tiny_models, "--dir", str(target)]) == 0
    out = capsys.readouterr().out
    assert (target / "model_set.json").is_file()
    assert f"skipping image: {os.path.join(tiny_models, 'image')} is a local folder" in out


def _local_copy(tiny_models, tmp_path):
    """The tiny set copied as a plain local set (not marked as a tiny one)."""
    copy = tmp_path / "set"
    shutil.copytree(tiny_models, copy)
    entries = _json(copy, "model_set.json")
    entries.pop("tiny_version")
    (copy / "model_set.json").write_text(json.dumps(entries))
    return copy


def test_check_of_a_local_folder_says_which_file_and_where_to_get_it_not_fetch(tiny_models, tmp_path, capsys):
    """`models fetch` skips local folders, so its suggestion went in a circle: the fix names the file to copy or
    download into that folder."""
    copy = _local_copy(tiny_models, tmp_path)
    os.remove(copy / "audio" / "unet" / "diffusion_pytorch_model.bin")
    (copy / "audio" / "vocoder" / "vocoder.pt").write_text("garbage")
    shutil.rmtree(copy / "clap")
    assert main(["models", "check", str(copy)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[-1] == f"model set {copy}: 3 problems"
    audio = copy / "audio"
    assert lines[0] == (
        f"audio '{audio}': unet/diffusion_pytorch_model.safetensors or unet/diffusion_pytorch_model.bin: is missing; "
        f"fix: copy unet/diffusion_pytorch_model.safetensors or unet/diffusion_pytorch_model.bin of this model into "
        f"{audio} (from where the folder came from, or its hub repository: `hf download REPO "
        f"unet/diffusion_pytorch_model.safetensors unet/diffusion_pytorch_model.bin --local-dir {audio}`), or point "
        f"the model set's 'audio' entry at a folder that has it")
    assert lines[1].startswith(f"vocoder '{audio}': vocoder/vocoder.pt: not a valid torch checkpoint")
    assert lines[1].endswith(f"fix: copy vocoder/vocoder.pt into {audio} again from where the folder came from, or "
                             f"download it from the model's hub repository: `hf download REPO vocoder/vocoder.pt "
                             f"--local-dir {audio} --force-download`")
    assert lines[2].startswith(f"clap '{copy / 'clap'}': (folder): does not exist; fix: copy the complete model into ")
    assert "--dir DIR" not in "\n".join(lines)


def test_check_of_a_tiny_copy_says_to_rebuild_it_there(tiny_models, tmp_path, capsys):
    copy = tmp_path / "set"
    shutil.copytree(tiny_models, copy)
    (copy / "audio" / "vocoder" / "vocoder.pt").write_text("garbage")
    assert main(["models", "check", str(copy)]) == 1
    line = capsys.readouterr().out.strip().splitlines()[0]
    assert line.endswith(f"; fix: rebuild the tiny set there: `pws-batch models build-tiny --dir {copy}`")


# ---------------------------------------------------------------------------------------------- fail fast
def _broken_set(tmp_path, tiny_models, component="audio") -> str:
    entries = {"name": "broken", **{c: os.path.join(tiny_models, c) for c in ("image", "audio", "clip", "clap")},
               "vocoder": os.path.join(tiny_models, "audio")}
    entries[component] = str(tmp_path / "missing-folder")
    path = tmp_path / "model_set.json"
    path.write_text(json.dumps(entries))
    return str(path)


def test_run_with_a_missing_component_fails_fast_in_one_line(tmp_path, capsys, tiny_models):
    import ray

    if ray.is_initialized():  # left by an earlier in-process test: the check below is about this run's Ray
        ray.shutdown()
    manifest = tmp_path / "m.csv"
    pd.DataFrame([dict(pair_id="a", image_prompt="dogs", audio_prompt="barking")]).to_csv(manifest, index=False)
    out = tmp_path / "out"
    rc = main(["run", str(manifest), "--out", str(out), "--models", _broken_set(tmp_path, tiny_models, "clap")])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in captured.out + captured.err
    assert err.startswith(f"pws-batch run: error: the model set {tmp_path / 'model_set.json'} is not complete: clap ")
    assert "missing-folder" in err and "does not exist" in err
    assert not out.exists() and not ray.is_initialized()  # no run.json, no Ray, no flow


def test_submit_with_a_missing_component_fails_before_asking_prefect(tmp_path, capsys, tiny_models, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens there: never reached
    manifest = tmp_path / "m.csv"
    pd.DataFrame([dict(pair_id="a", image_prompt="dogs", audio_prompt="barking")]).to_csv(manifest, index=False)
    rc = main(["submit", str(manifest), "--out", str(tmp_path / "out"),
               "--models", _broken_set(tmp_path, tiny_models, "image")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("pws-batch submit: error: the model set ") and "image '" in err and "Prefect" not in err


def test_the_run_checks_its_model_files_once_per_command(tmp_path, tiny_models, monkeypatch):
    """`pws-batch run` checks the model files before the flow, whose prepare asks again: within the command the
    second check is answered from the first; other settings, a later command, or a failed check ask anew."""
    from pws_batch.batch import run
    from pws_batch.batch.config import RunConfig, RunError
    from pws_batch.core import model_files

    calls = []
    real = model_files.check_model_set
    monkeypatch.setattr(model_files, "check_model_set", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = RunConfig().replace(engine={"models": "tiny"})
    broken = config.replace(engine={"models": _broken_set(tmp_path, tiny_models, "clap")})
    with run.answers_reused():
        run.check_models(config)
        run.check_models(config)
        assert len(calls) == 1
        run.check_models(config.replace(engine={"vocoder": "griffinlim"}))
        assert len(calls) == 2
        for _ in range(2):
            with pytest.raises(RunError, match="clap"):
                run.check_models(broken)
        assert len(calls) == 4
    run.check_models(config)
    assert len(calls) == 5


def test_the_flow_checks_the_models_before_it_says_running(tmp_path, tiny_models):
    """On a worker (submit), prepare() runs the same check: nothing written, no run.json left "running"."""
    from pws_batch.batch.config import RunConfig, RunError
    from pws_batch.batch.run import prepare

    manifest = tmp_path / "m.csv"
    pd.DataFrame([dict(pair_id="a", image_prompt="dogs", audio_prompt="barking")]).to_csv(manifest, index=False)
    models = _broken_set(tmp_path, tiny_models, "vocoder")
    config = RunConfig().replace(engine={"models": models})
    with pytest.raises(RunError, match=r"vocoder '.*missing-folder': \(folder\): does not exist"):
        prepare(str(manifest), str(tmp_path / "out"), config, log=lambda _line: None)
    assert not (tmp_path / "out" / "run.json").exists()
    # Griffin-Lim needs no vocoder: the same set is complete for such a run.
    assert not check_model_set(resolve_model_set(models), models, ("image", "audio", "clip", "clap"))


def test_a_load_failure_inside_an_actor_is_one_line(tmp_path, tiny_models):
    """Weights that pass the file check but do not load: the actor keeps one line, returned for every pair."""
    from pws_batch.batch.config import RunConfig
    from pws_batch.batch.engine import Ranker
    from pws_batch.batch.pair import CandidateBatch, PairRequest
    from pws_batch.core.params import GenerationParams

    broken = tmp_path / "clip"
    shutil.copytree(os.path.join(tiny_models, "clip"), broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    entries = {"name": "broken", "image": os.path.join(tiny_models, "image"), "audio": os.path.join(tiny_models, "audio"),
               "vocoder": os.path.join(tiny_models, "audio"), "clip": str(broken), "clap": os.path.join(tiny_models, "clap")}
    (tmp_path / "model_set.json").write_text(json.dumps(entries))
    ranker = Ranker(RunConfig().replace(engine={"models": str(tmp_path / "model_set.json"), "device": "cpu"}))
    info = ranker.info()
    assert info["model_loads"] == 0 and len(info["load_error"].splitlines()) == 1
    assert info["load_error"].startswith(f"cannot load the clip model '{broken}'")
    request = PairRequest(0, "p", GenerationParams("a", "b"), keep=1)
    ranked = ranker.rank_batch(CandidateBatch(request, 0, 1, generated=object()), seen=[])
    assert ranked.request.pair_id == "p" and ranked.error == info["load_error"] and ranked.generated is None



class _NotAWeight:
    """A class torch.load(weights_only=True) refuses to unpickle."""


@pytest.mark.parametrize("content", ["garbage", "foreign class"])
def test_a_vocoder_that_is_no_torch_checkpoint_is_named_so_without_unsafe_advice(tiny_models, tmp_path, content):
    """torch's own error suggests retrying with weights_only=False, which for a corrupt or foreign file would be
    unsafe advice: the load error says the file is not a valid torch checkpoint instead."""
    import torch

    from pws_batch.core.models import ModelLoadError, load_model_set_file, load_vocoder

    copy = tmp_path / "set"
    shutil.copytree(tiny_models, copy)
    path = copy / "audio" / "vocoder" / "vocoder.pt"
    if content == "garbage":
        path.write_text("garbage")
    else:  # a whole torch.save zip that weights_only refuses: passes the file check, fails at load
        torch.save({"generator": _NotAWeight()}, path)
    with pytest.raises(ModelLoadError) as caught:
        load_vocoder(load_model_set_file(str(copy / "model_set.json")), "cpu", torch.float32)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert f"{path} is not a valid torch checkpoint: " in message
    assert "weights_only` set to `False" not in message and "weights_only=False" not in message


def test_a_scorer_bin_that_is_no_torch_checkpoint_is_named_so_without_unsafe_advice(tiny_models, tmp_path):
    from pws_batch.core.models import ModelLoadError, load_scorer

    copy = tmp_path / "clap"
    shutil.copytree(os.path.join(tiny_models, "clap"), copy)
    (copy / "pytorch_model.bin").write_text("garbage")
    with pytest.raises(ModelLoadError) as caught:
        load_scorer("clap", str(copy), "cpu")
    message = str(caught.value)
    assert "is not a valid torch checkpoint" in message and "weights_only` set to `False" not in message


# ---------------------------------------------------------------------------------------------- bench
def test_bench_architecture_is_built_from_the_real_config_without_weights():
    """`bench sampler --architecture sd15` builds SD 1.5's U-Net and VAE from reference_configs/sd15.json (here on
    the meta device: the architecture without allocating its 860 M parameters)."""
    from accelerate import init_empty_weights

    from pws_batch.core.bench import build_unet_vae

    real = reference_config("sd15")
    with init_empty_weights():
        unet, vae = build_unet_vae("sd15", device="meta")
    for key in ("block_out_channels", "down_block_types", "up_block_types", "cross_attention_dim", "in_channels",
                "layers_per_block", "attention_head_dim", "sample_size"):
        value = unet.config[key]
        assert (list(value) if isinstance(value, (list, tuple)) else value) == real["unet"][key], key
    assert list(unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert list(vae.config.block_out_channels) == [128, 256, 512, 512] and vae.config.scaling_factor == 0.18215
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD 1.5's U-Net
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SD 1.5's VAE
    with pytest.raises(ValueError, match="unknown architecture 'sdxl'"):
        build_unet_vae("sdxl")


@pytest.mark.slow
def test_bench_on_an_architecture_runs_end_to_end_and_prints_per_100_step_cost(monkeypatch):
    """The whole `--architecture` path (random-weight models, random prompt embeddings, both ways timed), with
    SD 1.5's config narrowed so it takes seconds on a CPU (the full one: the test above and a GPU)."""
    import copy

    from pws_batch.core import model_files
    from pws_batch.core.bench import bench_sampler

    real = model_files.reference_config

    def narrowed(name):
        config = copy.deepcopy(real(name))
        if name == "sd15":
            config["unet"].update(block_out_channels=[32, 32, 32, 32], layers_per_block=1, norm_num_groups=8,
                                  attention_head_dim=2,  # and attention only at the lowest resolution
                                  down_block_types=["DownBlock2D"] * 3 + ["CrossAttnDownBlock2D"],
                                  up_block_types=["CrossAttnUpBlock2D"] + ["UpBlock2D"] * 3)
            config["vae"].update(block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4)
        return config

    monkeypatch.setattr(model_files, "reference_config", narrowed)
    lines: list[str] = []
    result = bench_sampler(candidates=2, steps=2, micro_batch=2, device="cpu", architecture="sd15",
                           print_fn=lines.append)
    assert lines[0].startswith("pws-batch bench sampler: models=random weights in the sd15 architecture device=cpu "
                               "dtype=float32 candidates=2 steps=2")
    assert "s/100-step candidate" in lines[1] and lines[-1].startswith("speedup ")
    assert result["seconds_per_100_step_candidate"] == pytest.approx(result["batched_s"] / 2 * 50)
    assert result["batched_evals"] == {"audio": 4, "image": 4}  # 2 candidates x 2 steps (t = 501, 1) each
