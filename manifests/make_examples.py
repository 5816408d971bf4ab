"""Writes the example manifests (run from the repository root: `python manifests/make_examples.py`).

example.parquet / example.csv: the prompt pairs of "Painting with Sound" and of the Images-that-Sound paper
(docs/algorithm.md). Two pairs start from guide sounds synthesised here (a police siren sweep, bird-like chirps),
so guided generation is exercised without shipping recordings.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import soundfile as sf

HERE = os.path.dirname(os.path.abspath(__file__))
RATE = 16000


def siren(seconds: float = 10.24) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    freq = 950 + 350 * np.sin(2 * np.pi * 0.5 * t)  # a wail between 600 and 1300 Hz
    return 0.5 * np.sin(2 * np.pi * np.cumsum(freq) / RATE)


def chirps(seconds: float = 10.24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros(int(RATE * seconds))
    for start in rng.uniform(0, seconds - 0.2, size=40):
        n = int(RATE * 0.12)
        t = np.arange(n) / RATE
        f0 = rng.uniform(2500, 4500)
        sweep = np.sin(2 * np.pi * (f0 * t + 6000 * t ** 2)) * np.hanning(n)
        i = int(start * RATE)
        out[i:i + n] += 0.3 * sweep
    return out


def main() -> None:
    sf.write(os.path.join(HERE, "guides", "siren.flac"), siren(), RATE)
    sf.write(os.path.join(HERE, "guides", "birds.flac"), chirps(), RATE)
    rows = [
        dict(pair_id="sea-birds", image_prompt="sea landscape with ships, grayscale",
             audio_prompt="birds singing softly", guidance_audio=10.0, guidance_image=8.0, strength=0.8,
             guide_audio="guides/birds.flac", source="Painting with Sound"),
        dict(pair_id="police-siren", image_prompt="a painting of police cars, grayscale", audio_prompt="police siren",
             guidance_audio=7.0, guidance_image=9.5, strength=0.8, guide_audio="guides/siren.flac",
             source="Painting with Sound"),
        dict(pair_id="temple-kitten", image_prompt="a series of column of a Greece temple, grayscale",
             audio_prompt="kitten meowing for attention", guidance_audio=7.0, guidance_image=9.5,
             source="Painting with Sound"),
        dict(pair_id="temple-dog", image_prompt="columns of a Greece temple, grayscale", audio_prompt="a dog barking",
             guidance_audio=6.0, guidance_image=9.5, source="Painting with Sound"),
        dict(pair_id="dogs", image_prompt="dogs, grayscale", audio_prompt="dogs barking, clean audio",
             guidance_audio=10.0, guidance_image=7.0, source="Painting with Sound"),
        dict(pair_id="racing-car", image_prompt="A picture of sport racing car, grayscale", audio_prompt="Car drifting",
             guidance_audio=7.5, guidance_image=8.0, source="Painting with Sound"),
        dict(pair_id="tigers", image_prompt="a colorful photo of tigers", audio_prompt="tiger growling",
             source="Images that Sound"),
        dict(pair_id="water-lily-pond", image_prompt="a colorful photo of a water-lily pond",
             audio_prompt="frog croaking", source="Images that Sound"),
    ]
    df = pd.DataFrame(rows)
    df.to_parquet(os.path.join(HERE, "example.parquet"), index=False)
    df.to_csv(os.path.join(HERE, "example.csv"), index=False)


if __name__ == "__main__":
    main()
