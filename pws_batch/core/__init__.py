"""One prompt pair on one device: parameters and their checks, the composite sampler, the canvas / spectrogram /
waveform codec, the vocoder, model sets and loading, the one-pair pipeline, the CLIP and CLAP scorers, media.

No Ray, Prefect, pyarrow or pandas here (tests/test_layers.py reads the imports and enforces it).
"""
