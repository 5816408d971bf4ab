"""The smaller commands with the tiny models: validate, inspect, models build-tiny / show, and the one-line
error for a model that cannot be loaded."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from pws_batch.cli import main


def test_validate_reports_every_bad_row_and_exits_non_zero(tmp_path, capsys, tiny_models):
    manifest = tmp_path / "m.csv"
    pd.DataFrame([
        dict(pair_id="a", image_prompt="dogs", audio_prompt="barking"),
        dict(pair_id="b", image_prompt="", audio_prompt="barking"),
        dict(pair_id="c", image_prompt="cats", audio_prompt="meow", guidance_image="high"),
        dict(pair_id="a", image_prompt="again", audio_prompt="dup"),
    ]).to_csv(manifest, index=False)
    assert main(["validate", str(manifest), "--models", "tiny"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{manifest}: 4 rows, 1 good, 3 bad"
    assert out[0].startswith("row 1 (pair_id 'b'): image_prompt: is missing")
    assert out[1].startswith("row 2 (pair_id 'c'): guidance_image: must be a number, got text 'high'; fix: ")
    assert out[2].startswith("row 3 (pair_id 'a'): pair_id: duplicate pair_id 'a' (first at row 0)")


def test_validate_names_every_problem_of_a_row_and_typos_only_among_unknown_columns(tmp_path, capsys, tiny_models):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image_prompt": 1, "audio_prompt": 2}\n'
                        '{"image_prompt": "a cat", "audio_prompt": "meowing", "seed": 9223372036854775807}\n')
    assert main(["validate", str(manifest), "--models", "tiny"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("row 0: image_prompt: must be text, got int 1 (fix: ")
    assert "; and audio_prompt: must be text" in lines[0] and not lines[0].endswith(")); fix: ")
    assert lines[1].startswith("row 1") and "seed: must be an integer in [0, 2**63 - 4096)" in lines[1]
    several = tmp_path / "several.csv"  # range problems too are named together, each with its fix
    several.write_text("image_prompt,audio_prompt,seed,steps,t_image\na cat,meowing,-1,0,1.5\n")
    assert main(["validate", str(several), "--models", "tiny"]) == 1
    line = capsys.readouterr().out.splitlines()[0]
    assert all(f"{name}: must be" in line for name in ("t_image", "steps", "seed")) and line.count("(fix: ") == 3
    no_audio = tmp_path / "no_audio.csv"
    no_audio.write_text("image_prompt,audio_promt\na cat,meowing\n")
    assert main(["validate", str(no_audio), "--models", "tiny"]) == 2
    assert "no column 'audio_prompt' (is 'audio_promt' a typo?)" in capsys.readouterr().err
    only_image = tmp_path / "only_image.csv"
    only_image.write_text("image_prompt\na cat\n")
    assert main(["validate", str(only_image), "--models", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "no column 'audio_prompt';" in err and "typo" not in err


def test_validate_of_the_example_manifests_passes(capsys, tiny_models):
    for name in ("example.parquet", "example.csv"):
        assert main(["validate", os.path.join("manifests", name), "--models", "tiny"]) == 0
        assert capsys.readouterr().out.strip().endswith("8 rows, 8 good, 0 bad")


def test_validate_of_an_unreadable_manifest_is_one_line(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err


def test_validate_of_a_manifest_without_rows_fails_as_run_would(tmp_path, capsys, tiny_models):
    manifest = tmp_path / "empty.csv"
    manifest.write_text("image_prompt,audio_prompt\n")
    assert main(["validate", str(manifest), "--models", "tiny"]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip().endswith("0 rows, 0 good, 0 bad") and "has no rows" in captured.err


def test_run_with_a_ray_address_nothing_listens_at_fails_at_once_in_one_line(tmp_path, capsys, tiny_models,
                                                                            monkeypatch):
    import socket

    for name in ("RAY_AUTH_MODE", "RAY_ENABLE_AUTO_CONNECT"):  # what run sets up for Ray: not for later tests
        monkeypatch.setenv(name, "")  # records the value before (none, maybe) to restore after the test
        monkeypatch.delenv(name)

    with socket.socket() as s:  # a port nothing listens at once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manifest, out = tmp_path / "m.csv", tmp_path / "out"
    manifest.write_text("image_prompt,audio_prompt\na cat,meowing\n")
    assert main(["run", str(manifest), "--out", str(out), "--models", "tiny", "--ray-address",
                 f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in err
    assert not out.exists() or not os.listdir(out)  # nothing written


def test_inspect_of_something_that_is_not_a_dataset(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a pws-batch dataset" in capsys.readouterr().err


def test_build_tiny_is_deterministic(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["models", "build-tiny", "--dir", str(a)]) == 0
    assert main(["models", "build-tiny", "--dir", str(b)]) == 0
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    assert "image/unet/diffusion_pytorch_model.safetensors" in files and "audio/vocoder/vocoder.pt" in files
    assert "audio/unet/diffusion_pytorch_model.bin" in files and "audio/text_encoder/pytorch_model.bin" in files
    assert "clap/pytorch_model.bin" in files and "clip/model.safetensors" in files
    for rel in files:  # every file, .bin and vocoder.pt included: the same bytes
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    import torch

    va = torch.load(a / "audio/vocoder/vocoder.pt", weights_only=True)["generator"]
    vb = torch.load(b / "audio/vocoder/vocoder.pt", weights_only=True)["generator"]
    assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)
    assert any(k.endswith("weight_g") for k in va)  # Auffusion's old-style weight-norm keys
    capsys.readouterr()
    assert main(["models", "show", str(a)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["image"] == str(a / "image") and shown["vocoder_subfolder"] == "vocoder"


def test_a_model_that_cannot_be_loaded_is_named_in_one_line(tmp_path, capsys, tiny_models):
    model_set = tmp_path / "model_set.json"
    model_set.write_text(json.dumps({"name": "broken", "image": "no-such-org/no-such-model",
                                     "audio": os.path.join(tiny_models, "audio"),
                                     "vocoder": os.path.join(tiny_models, "audio")}))
    # The model files are checked first (offline, before any weights): the check names the image model.
    rc = main(["generate", "--image-prompt", "x", "--audio-prompt", "y", "--models", str(model_set),
               "--steps", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "image 'no-such-org/no-such-model': (all files): none of its 11 files is in the Hugging Face cache" in err
    assert f"pws-batch models fetch {model_set}" in err
    assert not (tmp_path / "o").exists()


def _broken_audio_set(tmp_path, tiny_models, write) -> tuple[str, object]:
    import shutil

    broken = tmp_path / "audio"
    shutil.copytree(os.path.join(tiny_models, "audio"), broken)
    write(broken / "unet" / "diffusion_pytorch_model.bin")
    model_set = tmp_path / "model_set.json"
    model_set.write_text(json.dumps({"name": "broken", "image": os.path.join(tiny_models, "image"),
                                     "audio": str(broken), "vocoder": str(broken)}))
    return str(model_set), broken


def test_a_model_that_passes_the_check_but_cannot_be_loaded_is_named_in_one_line(tmp_path, capsys, tiny_models):
    """A whole torch.save zip (so the file check passes) holding an object torch.load(weights_only=True) refuses."""
    import argparse

    import torch

    model_set, broken = _broken_audio_set(tmp_path, tiny_models,
                                          lambda path: torch.save({"x": argparse.Namespace()}, path))
    rc = main(["generate", "--image-prompt", "x", "--audio-prompt", "y", "--models", model_set,
               "--steps", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert f"cannot load the audio model '{broken}'" in err and "HF_HUB_OFFLINE" in err


def test_a_damaged_weights_file_fails_the_check_before_loading(tmp_path, capsys, tiny_models):
    model_set, broken = _broken_audio_set(tmp_path, tiny_models, lambda path: path.write_bytes(b"not a checkpoint"))
    rc = main(["generate", "--image-prompt", "x", "--audio-prompt", "y", "--models", model_set,
               "--steps", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert (f"audio '{broken}': unet/diffusion_pytorch_model.bin: not a valid torch checkpoint" in err
            and not (tmp_path / "o").exists())


@pytest.mark.parametrize("component", ["audio", "vocoder"])
def test_a_missing_local_folder_is_named_with_its_component(tmp_path, capsys, tiny_models, component):
    entries = {"name": "broken", "image": os.path.join(tiny_models, "image"),
               "audio": os.path.join(tiny_models, "audio"), "vocoder": os.path.join(tiny_models, "audio")}
    entries[component] = str(tmp_path / "nowhere")
    (tmp_path / "nowhere").mkdir()
    model_set = tmp_path / "model_set.json"
    model_set.write_text(json.dumps(entries))
    rc = main(["generate", "--image-prompt", "x", "--audio-prompt", "y", "--models", str(model_set),
               "--steps", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"{component} '{tmp_path / 'nowhere'}': (all files): none of its" in err and "is in the folder" in err


def test_the_run_bar_ticks_per_pair_and_times_from_the_first_pair():
    """Resumed pairs are counted at once; the clock (rate, ETA) starts at the first pair ranked, not at start-up;
    a shard's commit never moves the bar back."""
    import io

    from tqdm import tqdm

    from pws_batch.cli import pair_progress

    now = [1000.0]
    bar = tqdm(total=0, unit="pair", file=io.StringIO(), disable=False, mininterval=0, smoothing=0)
    bar._time = lambda: now[0]  # tqdm's clock
    tick = pair_progress(bar)
    tick(2, 10)  # 2 pairs committed by an earlier run
    assert (bar.n, bar.total) == (2, 10)
    now[0] += 300  # start-up: Prefect, Ray, model loads
    tick(3, 10)  # the first pair ranked
    assert bar.n == 3 and bar.format_dict["elapsed"] == 0
    for done in (4, 5, 6):
        now[0] += 10
        tick(done, 10)
    tick(5, 10)  # a shard committed (counts fewer than were ranked): no step back
    assert bar.n == 6
    assert bar.format_dict["elapsed"] == 30 and "10.00s/pair" in str(bar)  # the steady rate
    assert "00:40" in str(bar)  # ETA: 4 pairs left at 10 s each, not the 300 s start-up averaged in


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    """`pws-batch validate BIG | head -1`: the closed pipe is no error message ('pws-batch: error: BrokenPipeError')."""
    import subprocess
    import sys

    path = tmp_path / "bad.csv"
    path.write_text("image_prompt,audio_prompt\n" + "".join(f",sound {i}\n" for i in range(5000)))  # ~600 KB of output
    proc = subprocess.Popen([sys.executable, "-m", "pws_batch.cli", "validate", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("row 0: image_prompt")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_fetching_the_tiny_set_points_at_building_it(capsys):
    """`models fetch tiny` (offline) said to run fetch on a machine that reaches huggingface.co: nothing of the tiny
    set is downloaded."""
    capsys.readouterr()
    assert main(["models", "fetch", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "pws-batch models build-tiny" in err and len(err.strip().splitlines()) == 1
