"""Media encodings shared by every writer: 8-bit grayscale PNG and 16 kHz mono WAV, as bytes."""

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
