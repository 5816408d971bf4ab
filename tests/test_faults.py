"""Faults and bad input answered in one line, before any work (issue 11): a manifest with nothing to make, an
output that cannot be written or is held by another run, guides changed under a resume, an ephemeral Prefect
server that does not start; a pair whose numbers blow up fails and is never kept.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from pws_batch.cli import main

RUN = ["--models", "tiny", "--candidates", "2", "--steps", "2"]


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and "Traceback" not in err, err
    return lines[-1]


@pytest.mark.parametrize("name, content, expected", [
    ("empty.jsonl", "", "has no rows"),
    ("header.csv", "image_prompt,audio_prompt\n", "has no rows"),
    ("broken.jsonl", '{"image_prompt": "a", "audio_prompt": \n', "no good row"),
    ("ragged.csv", "image_prompt,audio_prompt\ncats,meow,extra\n", "no good row"),
])
def test_run_refuses_a_manifest_with_no_good_row_as_submit_does(tmp_path, capsys, tiny_models, name, content,
                                                                 expected):
    manifest = tmp_path / name
    manifest.write_text(content)
    out = tmp_path / "out"
    assert main(["run", str(manifest), "--out", str(out), *RUN]) == 2
    err = capsys.readouterr().err
    assert expected in one_line(err) and "nothing was written" in one_line(err)
    assert not (out / "run.json").exists() and not (out / "data").exists()
    if name in ("broken.jsonl", "ragged.csv"):
        assert "rejected row 0: row: " in err  # the bad row is named, with its line


def test_run_into_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys, tiny_models):
    manifest = tmp_path / "pairs.csv"
    pd.DataFrame([dict(image_prompt="x", audio_prompt="y")]).to_csv(manifest, index=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["run", str(manifest), "--out", str(blocker / "out"), *RUN]) == 2
    line = one_line(capsys.readouterr().err)
    assert "cannot write to --out" in line and str(blocker) in line


def test_run_into_memory_is_refused_since_the_dataset_would_end_with_the_command(tmp_path, capsys, tiny_models):
    manifest = tmp_path / "pairs.csv"
    pd.DataFrame([dict(image_prompt="x", audio_prompt="y")]).to_csv(manifest, index=False)
    assert main(["run", str(manifest), "--out", "memory://ds", *RUN]) == 2
    assert "lives in this process's memory only" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("overwrite", [False, True])
def test_run_into_a_folder_of_other_files_is_refused_and_nothing_of_them_is_touched(tmp_path, capsys, tiny_models,
                                                                                    overwrite):
    manifest = tmp_path / "pairs.csv"
    pd.DataFrame([dict(image_prompt="x", audio_prompt="y")]).to_csv(manifest, index=False)
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "README.md").write_text("my notes")
    pd.DataFrame({"a": [1]}).to_parquet(out / "data" / "important.parquet")
    assert main(["run", str(manifest), "--out", str(out), *RUN, *(["--overwrite"] if overwrite else [])]) == 2
    line = one_line(capsys.readouterr().err)
    assert "already holds files that no pws-batch run wrote (README.md, data)" in line and "new or empty" in line
    assert sorted(os.listdir(out)) == ["README.md", "data"] and os.listdir(out / "data") == ["important.parquet"]
    assert (out / "README.md").read_text() == "my notes"


def test_run_into_an_output_held_by_a_live_run_is_refused_in_seconds(tmp_path, capsys, tiny_models):
    from pws_batch.batch import lease

    manifest = tmp_path / "pairs.csv"
    pd.DataFrame([dict(image_prompt="x", audio_prompt="y")]).to_csv(manifest, index=False)
    out = str(tmp_path / "out")
    with lease.acquire(out, "the first run", print):
        assert main(["run", str(manifest), "--out", out, *RUN]) == 2
        assert not os.path.exists(os.path.join(out, "run.json"))  # refused before any flow run or validation
    line = one_line(capsys.readouterr().err)
    assert "is in use by the first run" in line and f"pid {os.getpid()}" in line


def test_resume_refuses_changed_guide_files(tmp_path, capsys, tiny_models):
    from pws_batch.batch.config import RunConfig
    from pws_batch.batch.dataset import Output
    from pws_batch.batch.run import check_output

    rate = 16000
    t = np.arange(rate) / rate
    sf.write(tmp_path / "guide.wav", 0.4 * np.sin(2 * np.pi * 440 * t), rate)
    manifest = tmp_path / "pairs.csv"
    pd.DataFrame([dict(image_prompt="x", audio_prompt="y", guide_audio="guide.wav")]).to_csv(manifest, index=False)
    out = str(tmp_path / "out")
    config = RunConfig().replace(engine={"models": "tiny"}, defaults={"num_candidates": 2, "steps": 2},
                                 plan={"allow_guides": ("local",)})
    # What an earlier run into `out` recorded (its fingerprint covers the guide's content).
    Output(out).write_json("run.json", {"status": "incomplete",
                                        "fingerprint": check_output(str(manifest), out, config)})
    assert check_output(str(manifest), out, config)  # the same guide: the resume goes on
    sf.write(tmp_path / "guide.wav", 0.4 * np.sin(2 * np.pi * 660 * t), rate)  # same path, other sound
    assert main(["run", str(manifest), "--out", out, *RUN]) == 2
    line = one_line(capsys.readouterr().err)
    assert "already holds a dataset made from another manifest or with other settings" in line
    assert "guides_sha256" in line and "--overwrite" in line


def test_submit_and_validate_refuse_guides_from_elsewhere_unless_allowed(tmp_path, capsys, tiny_models):
    from pws_batch.batch.config import RunConfig
    from pws_batch.batch.run import validate

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rate = 16000
    sf.write(elsewhere / "g.wav", np.zeros(rate), rate)
    folder = tmp_path / "m"
    folder.mkdir()
    manifest = folder / "pairs.csv"
    pd.DataFrame([dict(pair_id="far", image_prompt="x", audio_prompt="y", guide_audio=str(elsewhere / "g.wav")),
                  dict(pair_id="web", image_prompt="x", audio_prompt="y", guide_audio="http://127.0.0.1:9/g.wav")]
                 ).to_csv(manifest, index=False)
    # submit's default (and the flow's): the manifest's own storage only
    validated, _ = validate(str(manifest), RunConfig().replace(engine={"models": "tiny"}))
    assert validated.requests == [] and {r.field for r in validated.rejections} == {"guide_audio"}
    # run / validate: local files too, but never the URL
    assert main(["validate", str(manifest), "--models", "tiny"]) == 1
    out = capsys.readouterr().out
    assert "row 1 (pair_id 'web'): guide_audio: 'http://127.0.0.1:9/g.wav' is outside the places" in out
    assert "'far'" not in out
    validated, _ = validate(str(manifest), RunConfig().replace(engine={"models": "tiny"},
                                                               plan={"allow_guides": (str(elsewhere),)}))
    assert [r.pair_id for r in validated.requests] == ["far"]


@pytest.mark.slow
def test_an_ephemeral_prefect_server_that_does_not_start_is_one_line_naming_the_settings(tmp_path, tiny_models):
    manifest = tmp_path / "pairs.csv"
    pd.DataFrame([dict(image_prompt="x", audio_prompt="y")]).to_csv(manifest, index=False)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect" / "not-yet"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")  # the user's own (too short) setting
    proc = subprocess.run([sys.executable, "-m", "pws_batch.cli", "run", str(manifest), "--out",
                           str(tmp_path / "out"), *RUN], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc.stderr)
    assert "did not answer within 1 s (tried twice" in line
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in line and "PREFECT_API_URL" in line
    assert (tmp_path / "prefect" / "not-yet").is_dir()  # PREFECT_HOME was created


@pytest.mark.slow
def test_a_pair_whose_latents_blow_up_fails_with_the_reason_and_is_never_kept(tiny_models):
    import torch

    from pws_batch.batch.config import RunConfig
    from pws_batch.batch.engine import Generator, Ranker, nonfinite_scores
    from pws_batch.batch.pair import PairRequest
    from pws_batch.core.params import GenerationParams

    config = RunConfig().replace(engine={"models": "tiny", "device": "cpu", "dtype": "fp32", "vocoder": "griffin-lim",
                                         "micro_batch": 2})
    generator = Generator(config)
    request = PairRequest(0, "p", GenerationParams("x", "y", steps=2, num_candidates=2), 1)
    good = generator.generate_batch(request, 0, 2)
    assert good.ok and len(good.generated.candidates) == 2
    with torch.no_grad():  # a U-Net that overflows, as absurd guidance would
        generator.pipe.image_pipe.unet.conv_out.bias.fill_(float("inf"))
    broken = generator.generate_batch(request, 0, 2)
    assert broken.error.startswith("NonFiniteError: the denoised latents hold NaN or infinite values")
    assert "lower the guidance" in broken.error
    ranker = Ranker(config)
    assert ranker.rank_batch(broken, []) == broken  # nothing to rank, nothing kept
    for c in good.generated.candidates:
        c.audio = np.full_like(c.audio, np.nan)
    ranked = ranker.rank_batch(good, [])
    assert ranked.scored == [] and "non-finite scores" in ranked.error
    assert nonfinite_scores([0.1, 0.2], [0.3, 0.4]) is None
    assert "CLIP of candidates [1]" in nonfinite_scores([0.1, float("nan")], [0.3, 0.4])
