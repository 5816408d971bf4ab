"""Canvas <-> log-mel spectrogram <-> waveform, in Auffusion's format (docs/algorithm.md).

A canvas is a float tensor [B, 3, 256, F] in [0, 1] (what the VAEs read and write, F = 1024 frames);
a log-mel is [B, 256, F] in natural-log units; a waveform is [B, F * 160] at 16 kHz.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from pws_batch.core.media import SAMPLE_RATE  # noqa: E402 - 16 kHz, defined with the media encodings (no torch)
N_FFT = 2048
WIN_LENGTH = 1024
HOP = 160
N_MELS = 256
F_MIN = 0.0
F_MAX = 8000.0
FRAMES = 1024
NUM_SAMPLES = FRAMES * HOP  # 163,840 samples = 10.24 s
PAD = (N_FFT - HOP) // 2  # 944 samples of reflect padding each side
PEAK = 0.95
LOG_MIN = math.log(1e-5)
LOG_MAX = math.log(200.0)
CANVAS_HEIGHT, CANVAS_WIDTH = 256, 1024


# ---------------------------------------------------------------------------------------------- reading
# Reading guide files needs no torch: it lives with the media encodings (validation reads guides on the driver).
from pws_batch.core.media import read_audio, read_image  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------- waveform
def prepare_waveform(wave: np.ndarray, rate: int, num_samples: int = NUM_SAMPLES) -> np.ndarray:
    """Any mono waveform -> 16 kHz, cropped or zero-padded to `num_samples`, peak-normalised to 0.95."""
    from scipy.signal import resample_poly

    wave = np.asarray(wave, dtype=np.float64)
    if rate != SAMPLE_RATE:
        g = math.gcd(int(rate), SAMPLE_RATE)
        wave = resample_poly(wave, SAMPLE_RATE // g, int(rate) // g)
    wave = wave[:num_samples]
    if wave.shape[0] < num_samples:
        wave = np.pad(wave, (0, num_samples - wave.shape[0]))
    return peak_normalize(wave).astype(np.float32)


def peak_normalize(wave: np.ndarray, peak: float = PEAK) -> np.ndarray:
    top = np.abs(wave).max()
    return wave * (peak / top) if top > 0 else wave


@lru_cache(maxsize=None)
def mel_basis() -> torch.Tensor:
    """[256, 1025] Slaney-style mel filters (librosa's default basis), 0-8000 Hz."""
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=N_MELS, min_frequency=F_MIN,
                         max_frequency=F_MAX, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(np.ascontiguousarray(fb.T)).float()


@lru_cache(maxsize=None)
def _window(device: str = "cpu") -> torch.Tensor:
    return torch.hann_window(WIN_LENGTH, device=device)


def stft(wave: torch.Tensor) -> torch.Tensor:
    """Complex STFT [B, 1025, frames]: reflect pad 944 each side, center=False, Hann 1024, hop 160."""
    padded = torch.nn.functional.pad(wave.unsqueeze(1), (PAD, PAD), mode="reflect").squeeze(1)
    return torch.stft(padded, N_FFT, hop_length=HOP, win_length=WIN_LENGTH, window=_window(str(wave.device)),
                      center=False, normalized=False, onesided=True, return_complex=True)


def istft(spec: torch.Tensor) -> torch.Tensor:
    """The least-squares inverse of `stft` (overlap-add with window-square normalisation), [B, frames * 160].

    Written out because torch.istft refuses center=False with a window shorter than n_fft (the envelope is
    0 at the signal's first samples, which here lie in the reflect padding and are cropped anyway).
    """
    frames = spec.shape[-1]
    window = torch.nn.functional.pad(_window(str(spec.device)), ((N_FFT - WIN_LENGTH) // 2,) * 2)
    chunks = torch.fft.irfft(spec, n=N_FFT, dim=1) * window[None, :, None]  # [B, n_fft, frames]
    length = (frames - 1) * HOP + N_FFT
    fold = dict(output_size=(1, length), kernel_size=(1, N_FFT), stride=(1, HOP))
    signal = torch.nn.functional.fold(chunks, **fold)[:, 0, 0]
    envelope = torch.nn.functional.fold((window ** 2)[None, :, None].expand(1, N_FFT, frames), **fold)[0, 0, 0]
    signal = signal / envelope.clamp_min(1e-8)
    return signal[:, PAD:length - PAD]


def waveform_to_logmel(wave: torch.Tensor) -> torch.Tensor:
    """[B, N] waveform (already prepared) -> [B, 256, N / 160] log-mel: log(clamp(mel @ |STFT|, 1e-5))."""
    spec = stft(wave)
    magnitude = torch.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
    mel = torch.matmul(mel_basis().to(wave.device), magnitude)
    return torch.log(torch.clamp(mel, min=1e-5))


# ---------------------------------------------------------------------------------------------- canvas
def logmel_to_canvas(logmel: torch.Tensor) -> torch.Tensor:
    """[B, 256, F] log-mel -> [B, 3, 256, F] canvas in [0, 1], low frequencies at the bottom."""
    canvas = ((logmel - LOG_MIN) / (LOG_MAX - LOG_MIN)).clamp(0.0, 1.0)
    return torch.flip(canvas, dims=[1]).unsqueeze(1).repeat(1, 3, 1, 1)


def canvas_to_logmel(canvas: torch.Tensor) -> torch.Tensor:
    """[B, 3, 256, F] canvas -> [B, 256, F] log-mel: flip back, average the channels, rescale."""
    gray = torch.flip(canvas.float().mean(dim=1), dims=[1])
    return gray * (LOG_MAX - LOG_MIN) + LOG_MIN


def audio_to_canvas(wave: np.ndarray, rate: int) -> torch.Tensor:
    """A guide sound (any rate and length) -> [1, 3, 256, 1024] canvas."""
    prepared = torch.from_numpy(prepare_waveform(wave, rate))[None]
    return logmel_to_canvas(waveform_to_logmel(prepared))


def image_to_canvas(image) -> torch.Tensor:
    """A guide picture (any size or mode) -> grayscale, resized to 256 x 1024 -> [1, 3, 256, 1024]."""
    from PIL import Image

    gray = image.convert("L").resize((CANVAS_WIDTH, CANVAS_HEIGHT), Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)
    return array[None, None].repeat(1, 3, 1, 1)


def load_guide_canvas(guide_audio: str | None = None, guide_image: str | None = None) -> torch.Tensor | None:
    if guide_audio:
        return audio_to_canvas(*read_audio(guide_audio))
    if guide_image:
        return image_to_canvas(read_image(guide_image))
    return None


def to_uint8(canvas_gray: torch.Tensor) -> np.ndarray:
    """[..., H, W] in [0, 1] -> uint8 array (8-bit grayscale)."""
    return (canvas_gray.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


# ---------------------------------------------------------------------------------------------- Griffin-Lim
@lru_cache(maxsize=None)
def _mel_pinv() -> torch.Tensor:
    return torch.linalg.pinv(mel_basis())


def logmel_to_magnitude(logmel: torch.Tensor) -> torch.Tensor:
    """Approximate linear magnitude [B, 1025, F] from a log-mel (pseudo-inverse of the filters, >= 0)."""
    return torch.matmul(_mel_pinv().to(logmel.device), torch.exp(logmel.float())).clamp_min(0.0)


def griffin_lim(logmel: torch.Tensor, n_iter: int = 32, momentum: float = 0.99, seed: int = 0,
                seeds: list[int] | None = None) -> torch.Tensor:
    """The weight-free vocoder: fast Griffin-Lim (Perraudin et al.) on the inverted mel, [B, F * 160].

    Row i starts from a random phase drawn from its own generator seeded with `seeds[i]` (all rows with `seed`
    when `seeds` is not given) and is vocoded on its own, so a candidate's sound does not depend on the batch it
    is vocoded in: batched FFTs and matmuls round differently from single ones on some CPUs, and 32 iterations
    with momentum 0.99 grow that to ~1e-3. Row by row is also faster on a CPU (8 rows: 8.3 s, batched 15.2 s).
    """
    seeds = list(seeds) if seeds is not None else [seed] * logmel.shape[0]
    if len(seeds) != logmel.shape[0]:
        raise ValueError(f"griffin_lim: {len(seeds)} seeds for {logmel.shape[0]} spectrograms")
    return torch.cat([_griffin_lim_row(logmel[i:i + 1], int(s), n_iter, momentum) for i, s in enumerate(seeds)])


def _griffin_lim_row(logmel: torch.Tensor, seed: int, n_iter: int, momentum: float) -> torch.Tensor:
    """Griffin-Lim of one [1, 256, F] log-mel -> [1, F * 160]."""
    magnitude = logmel_to_magnitude(logmel)
    uniform = torch.rand(magnitude.shape, generator=torch.Generator().manual_seed(seed))
    phase = torch.exp(2j * math.pi * uniform).to(magnitude.device)
    previous = torch.zeros_like(phase)
    for _ in range(n_iter):
        rebuilt = stft(istft(magnitude * phase))
        accelerated = rebuilt - (momentum / (1 + momentum)) * previous
        phase = accelerated / accelerated.abs().clamp_min(1e-16)
        previous = rebuilt
    return istft(magnitude * phase)
