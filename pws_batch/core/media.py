"""Media without torch: the encodings every writer shares (8-bit grayscale PNG and 16 kHz mono WAV, as bytes)
and the reading of guide files (any sound libsndfile reads, any picture PIL reads, from a path or fsspec URI)."""

from __future__ import annotations

import io

import numpy as np

SAMPLE_RATE = 16_000  # Hz, of every sound (pws_batch.core.codec uses this one); defined here so that encoding
                     # media needs no torch (the orchestration's stand-in actors import this module)


def png_bytes(gray: np.ndarray) -> bytes:
    """uint8 [H, W] -> 8-bit grayscale PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def wav_bytes(audio: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """float [-1, 1] mono waveform -> 16-bit PCM WAV (soundfile wants a 1-D array for mono)."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0), rate,
             format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def read_audio(uri: str) -> tuple[np.ndarray, int]:
    """A sound file (any format libsndfile reads) from a path or fsspec URI, as mono float32 and its rate."""
    import fsspec
    import soundfile as sf

    with fsspec.open(uri, "rb") as f:
        data, rate = sf.read(io.BytesIO(f.read()), dtype="float32", always_2d=True)
    if data.shape[0] == 0:
        raise ValueError("the file holds no samples")
    return data.mean(axis=1), int(rate)


def read_image(uri: str):
    """An image file from a path or fsspec URI, as a PIL image (fully decoded, so a broken file fails here)."""
    import fsspec
    from PIL import Image, UnidentifiedImageError

    with fsspec.open(uri, "rb") as f:
        data = f.read()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:  # its message names the in-memory buffer, not the file
        raise ValueError(f"not a picture PIL can read ({len(data)} bytes beginning {data[:8]!r})") from None
    return image
