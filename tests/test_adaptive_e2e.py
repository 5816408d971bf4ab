"""The adaptive budget end to end with the tiny models: `pws-batch run` on a real local Ray and a real Prefect
server. A pair whose targets are met by its first micro-batch makes only that micro-batch; a pair whose targets
can never be met (a CLIP score above 1) makes all N; the sidecar and the run's counts say so."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from servers import cli_with_server


@pytest.mark.slow
def test_targets_stop_a_pair_after_its_first_micro_batch_or_never(tmp_path, tiny_models):
    manifest = tmp_path / "adaptive.parquet"
    pd.DataFrame([dict(pair_id="met", image_prompt="a castle", audio_prompt="bells", target_clip=0.0, target_clap=0.0),
                  dict(pair_id="never", image_prompt="a dog", audio_prompt="barking", target_clip=1.01,
                       target_clap=0.0),
                  dict(pair_id="plain", image_prompt="a cat", audio_prompt="meowing", target_clip=None,
                       target_clap=None)]).to_parquet(manifest, index=False)
    out = str(tmp_path / "out")
    returncode, log = cli_with_server(tmp_path, "run", str(manifest), "--out", out, "--models", "tiny", "--candidates",
                                      "4", "--micro-batch", "2", "--steps", "3", "--keep", "1", "--vocoder",
                                      "griffin-lim")
    assert returncode == 0, log[-4000:]
    candidates = pd.read_parquet(os.path.join(out, "candidates"))
    used = candidates.groupby("pair_id")["candidates_used"].first().to_dict()
    assert used == {"met": 2, "never": 4, "plain": 4}
    assert candidates.groupby("pair_id").size().to_dict() == used
    assert sorted(candidates[candidates.pair_id == "met"].seed) == [0, 1]
    data = pd.read_parquet(os.path.join(out, "data"))
    assert sorted(data.pair_id) == ["met", "never", "plain"]
    assert data.set_index("pair_id").candidates_used.to_dict() == used
    counts = json.load(open(os.path.join(out, "run.json")))["counts"]
    assert counts["pairs_stopped_early"] == 1 and counts["candidates"] == 10
    assert counts["unet_evals_per_kept_pair"] == pytest.approx(counts["unet_evals"] / 3, abs=0.1)
    # the stopped pair used about half the U-Net evaluations of a full pair
    evals = data.set_index("pair_id").unet_evals
    assert evals["met"] * 2 == evals["never"] == evals["plain"]
    # what made the sounds is recorded where users look: each row, run.json's models and the card
    assert set(data.model_vocoder) == {"griffin-lim"}
    assert json.load(open(os.path.join(out, "run.json")))["models"]["vocoder"] == "griffin-lim"
    card = open(os.path.join(out, "README.md")).read()
    assert "- vocoder: `griffin-lim`" in card and "| engine.vocoder | griffin-lim |" in card
