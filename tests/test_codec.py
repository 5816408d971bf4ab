"""The canvas <-> log-mel <-> waveform codec in Auffusion's format (docs/algorithm.md, "Canvas <-> spectrogram <->
waveform").

Checks shapes and value ranges of waveform -> canvas, the canvas mapping and its inverse, the vertical flip
(low frequencies at the bottom), waveform preparation (resampling, crop / zero pad, peak 0.95), the mel basis
against an independent numpy Slaney implementation (librosa's algorithm, written out here), the log-mel against
an independent numpy STFT, STFT / inverse STFT reconstruction, Griffin-Lim recovering a tone's frequency, and
reading guide sounds / pictures from files.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from pws_batch.core import codec

SR = 16_000
N = 163_840  # 10.24 s


def tone(freq: float, seconds: float = N / SR, rate: int = SR, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def canvas_of(wave: np.ndarray, rate: int = SR) -> torch.Tensor:
    prepared = torch.from_numpy(codec.prepare_waveform(wave, rate))[None]
    return codec.logmel_to_canvas(codec.waveform_to_logmel(prepared))


def peak_frequency(wave: np.ndarray, rate: int = SR) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[np.argmax(spectrum)])


# ------------------------------------------------------------------------------------------------ Slaney mel
def hz_to_mel(f):
    """Slaney's mel scale (librosa, htk=False): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def slaney_mel_basis(sr=SR, n_fft=2048, n_mels=256, fmin=0.0, fmax=8000.0) -> np.ndarray:
    """librosa.filters.mel's default (htk=False, norm='slaney'), written out: [n_mels, 1 + n_fft // 2]."""
    fftfreqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]
    weights = np.zeros((n_mels, len(fftfreqs)))
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights


def mel_centers(n_mels=256, fmin=0.0, fmax=8000.0) -> np.ndarray:
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))[1:-1]


def logmel_by_numpy(wave: np.ndarray) -> np.ndarray:
    """The spec's log-mel, independently: reflect pad 944, frames of 2048 (Hann 1024 centred), hop 160."""
    pad = (2048 - 160) // 2
    x = np.pad(wave.astype(np.float64), (pad, pad), mode="reflect")
    n = np.arange(1024)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / 1024)  # periodic Hann, as torch.hann_window
    window = np.zeros(2048)
    window[512:1536] = hann
    frames = 1 + (len(x) - 2048) // 160
    idx = np.arange(2048)[None, :] + 160 * np.arange(frames)[:, None]
    spec = np.fft.rfft(x[idx] * window, axis=1).T  # [1025, frames]
    magnitude = np.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
    return np.log(np.maximum(slaney_mel_basis() @ magnitude, 1e-5))


# ------------------------------------------------------------------------------------------------ tests
def test_tone_to_canvas_shape_range_and_channels():
    canvas = canvas_of(tone(440.0))
    assert canvas.shape == (1, 3, 256, 1024)
    assert canvas.dtype == torch.float32
    assert float(canvas.min()) >= 0.0 and float(canvas.max()) <= 1.0
    assert torch.equal(canvas[:, 0], canvas[:, 1]) and torch.equal(canvas[:, 0], canvas[:, 2])
    # a tone is not silence: some of the canvas is bright, most is dark
    assert float(canvas.max()) > 0.5 and float(canvas.median()) < float(canvas.max())


def test_logmel_shape_and_frames():
    wave = torch.from_numpy(codec.prepare_waveform(tone(1000.0), SR))[None]
    assert wave.shape == (1, N)
    logmel = codec.waveform_to_logmel(wave)
    assert logmel.shape == (1, 256, 1024)
    assert float(logmel.min()) >= math.log(1e-5) - 1e-6


def test_logmel_matches_an_independent_numpy_implementation():
    rng = np.random.default_rng(0)
    # 1 s: noise (energy in every band) plus a loud tone, so both clamped and large values occur
    wave = (0.1 * rng.standard_normal(SR) + 0.5 * np.sin(2 * np.pi * 523.0 * np.arange(SR) / SR)).astype(np.float32)
    ours = codec.waveform_to_logmel(torch.from_numpy(wave)[None])[0].double().numpy()
    ref = logmel_by_numpy(wave)
    assert ours.shape == ref.shape == (256, SR // 160)
    # compared in linear units (log amplifies float32 rounding near the 1e-5 floor)
    np.testing.assert_allclose(np.exp(ours), np.exp(ref), rtol=1e-3, atol=1e-4 * np.exp(ref).max())


def test_canvas_mapping_formula_flip_and_inverse():
    g = torch.Generator().manual_seed(0)
    lo, hi = math.log(1e-5), math.log(200.0)
    x = torch.rand(2, 256, 64, generator=g) * (hi - lo + 4) + (lo - 2)  # some values out of range both sides
    canvas = codec.logmel_to_canvas(x)
    assert canvas.shape == (2, 3, 256, 64)
    expected = ((x - lo) / (hi - lo)).clamp(0, 1)
    # row r of the canvas is mel band 255 - r (flipped vertically), every channel
    for c in range(3):
        torch.testing.assert_close(canvas[:, c], torch.flip(expected, dims=[1]), rtol=0, atol=1e-6)
    back = codec.canvas_to_logmel(canvas)
    inside = (x >= lo) & (x <= hi)
    assert inside.float().mean() > 0.5
    assert torch.allclose(back[inside], x[inside], atol=1e-5)
    # out of range values come back clamped to the ends
    assert torch.allclose(back[x > hi], torch.full_like(back[x > hi], hi), atol=1e-5)
    assert torch.allclose(back[x < lo], torch.full_like(back[x < lo], lo), atol=1e-5)


def test_canvas_to_logmel_averages_the_channels():
    g = torch.Generator().manual_seed(1)
    canvas = torch.rand(1, 3, 256, 16, generator=g)
    lo, hi = math.log(1e-5), math.log(200.0)
    expected = torch.flip(canvas.mean(dim=1), dims=[1]) * (hi - lo) + lo
    torch.testing.assert_close(codec.canvas_to_logmel(canvas), expected)


@pytest.mark.parametrize("freq", [200.0, 1000.0, 6000.0])
def test_low_frequencies_at_the_bottom(freq):
    canvas = canvas_of(tone(freq))[0, 0]
    brightest_row = int(canvas.mean(dim=1).argmax())
    band = int(np.argmin(np.abs(mel_centers() - freq)))
    assert abs(brightest_row - (255 - band)) <= 2
    if freq == 200.0:
        assert brightest_row > 200
    if freq == 6000.0:
        assert brightest_row < 50


@pytest.mark.parametrize("rate", [44_100, 22_050, 48_000, 8_000])
def test_prepare_waveform_resamples_and_zero_pads(rate):
    wave = tone(1000.0, seconds=3.0, rate=rate, amplitude=0.2)
    out = codec.prepare_waveform(wave, rate)
    assert out.shape == (N,) and out.dtype == np.float32
    assert abs(float(np.abs(out).max()) - 0.95) < 1e-5
    n_signal = 3 * SR
    assert np.all(out[n_signal + 16:] == 0.0)  # zero padded (a few samples of resampling filter tail allowed)
    body = out[1000:n_signal - 1000]
    assert np.abs(body).max() > 0.9
    assert abs(peak_frequency(body) - 1000.0) < 2.0  # the tone keeps its pitch at 16 kHz


def test_prepare_waveform_crops_long_input_and_normalises_what_is_kept():
    rng = np.random.default_rng(2)
    wave = (0.1 * rng.standard_normal(20 * SR)).astype(np.float32)
    wave[15 * SR] = 5.0  # a spike after 10.24 s: cropped away, so it must not set the level
    out = codec.prepare_waveform(wave, SR)
    assert out.shape == (N,)
    kept = wave[:N].astype(np.float64)
    np.testing.assert_allclose(out, kept * 0.95 / np.abs(kept).max(), rtol=1e-5, atol=1e-7)
    assert abs(float(np.abs(out).max()) - 0.95) < 1e-6


def test_prepare_waveform_crops_long_resampled_input():
    out = codec.prepare_waveform(tone(300.0, seconds=20.0, rate=44_100), 44_100)
    assert out.shape == (N,)
    assert np.abs(out[-1000:]).max() > 0.5  # no zero tail: the input is longer than 10.24 s
    assert abs(float(np.abs(out).max()) - 0.95) < 1e-5


def test_prepare_waveform_silence_stays_silent():
    out = codec.prepare_waveform(np.zeros(SR, dtype=np.float32), SR)
    assert out.shape == (N,) and np.all(out == 0) and np.all(np.isfinite(out))


@pytest.mark.parametrize("freq", [440.0, 1000.0])
def test_griffin_lim_round_trip_keeps_the_frequency(freq):
    wave = torch.from_numpy(codec.prepare_waveform(tone(freq), SR))[None]
    logmel = codec.waveform_to_logmel(wave)
    out = codec.griffin_lim(logmel)
    assert out.shape == (1, N)
    audio = out[0].numpy()
    assert np.all(np.isfinite(audio)) and np.abs(audio).max() > 1e-3
    # mel bands near 0.4-1 kHz are ~12-30 Hz wide: the peak must land within 3 %
    assert abs(peak_frequency(audio) - freq) <= 0.03 * freq


def test_griffin_lim_phase_comes_from_each_rows_seed_whatever_the_batch():
    """Candidate i's sound from a batch equals the same spectrogram vocoded alone with the same seed."""
    waves = [codec.prepare_waveform(tone(f), SR) for f in (330.0, 440.0, 880.0)]
    logmel = codec.waveform_to_logmel(torch.from_numpy(np.stack(waves)))
    batch = codec.griffin_lim(logmel, seeds=[7, 8, 9])
    alone = codec.griffin_lim(logmel[1:2], seeds=[8])
    np.testing.assert_allclose(batch[1].numpy(), alone[0].numpy(), atol=1e-6)
    other_seed = codec.griffin_lim(logmel[1:2], seeds=[9])
    assert np.abs(other_seed[0].numpy() - alone[0].numpy()).max() > 1e-2  # the seed matters
    with pytest.raises(ValueError, match="2 seeds for 3 spectrograms"):
        codec.griffin_lim(logmel, seeds=[1, 2])


def test_mel_basis_shape_and_filters():
    fb = codec.mel_basis()
    assert fb.shape == (256, 1025)
    assert float(fb.min()) >= 0.0
    freqs = np.linspace(0, SR / 2, 1025)
    w = fb.double().numpy()
    assert np.all(w.sum(axis=1) > 0)  # no empty filter
    peaks = freqs[np.argmax(w, axis=1)]
    centroids = (w * freqs).sum(axis=1) / w.sum(axis=1)
    assert np.all(np.diff(peaks) >= 0) and peaks[-1] > peaks[0]
    assert np.all(np.diff(centroids) > 0)
    assert peaks[0] < 30.0 and peaks[-1] > 7800.0  # spans 0 .. 8000 Hz
    assert w[0, 0] == 0.0 and w[-1, -1] == 0.0  # the first filter starts at 0 Hz, the last ends at 8000 Hz
    # librosa's default (Slaney) basis, computed independently
    np.testing.assert_allclose(w, slaney_mel_basis(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("batch", [1, 2])
def test_istft_inverts_stft(batch):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, N, generator=g) * 0.3
    spec = codec.stft(x)
    assert spec.shape == (batch, 1025, 1024)
    y = codec.istft(spec)
    assert y.shape == x.shape
    assert float((y - x).abs().max()) < 1e-4


def test_stft_matches_the_spec_frames():
    """Frame i of the STFT is the FFT of the reflect-padded signal [160 i, 160 i + 2048) under a centred Hann."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(3200).astype(np.float32)
    spec = codec.stft(torch.from_numpy(x)[None])[0].numpy()
    assert spec.shape == (1025, 20)
    padded = np.pad(x.astype(np.float64), (944, 944), mode="reflect")
    window = np.zeros(2048)
    window[512:1536] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(1024) / 1024)
    for i in (0, 7, 19):
        frame = np.fft.rfft(padded[160 * i:160 * i + 2048] * window)
        np.testing.assert_allclose(spec[:, i], frame, rtol=1e-4, atol=1e-3)


def test_audio_to_canvas_from_a_stereo_44k_file(tmp_path):
    left, right = tone(500.0, 4.0, 44_100, 0.5), tone(3000.0, 4.0, 44_100, 0.1)
    path = tmp_path / "guide.wav"
    sf.write(path, np.stack([left, right], axis=1), 44_100, subtype="FLOAT")
    wave, rate = codec.read_audio(str(path))
    assert rate == 44_100 and wave.ndim == 1 and wave.shape == left.shape
    np.testing.assert_allclose(wave, (left + right) / 2, atol=1e-6)  # mono mixdown
    canvas = codec.audio_to_canvas(wave, rate)
    assert canvas.shape == (1, 3, 256, 1024)
    assert float(canvas.min()) >= 0 and float(canvas.max()) <= 1
    # both channels' tones are in the mixdown: their rows are bright in the first 4 s of frames
    rows = canvas[0, 0, :, 10:390].mean(dim=1)
    centers = mel_centers()
    for f in (500.0, 3000.0):
        row = 255 - int(np.argmin(np.abs(centers - f)))
        assert float(rows[row - 2:row + 3].max()) > float(rows.median()) + 0.2
    # after 4 s, zero padding: silence maps to the bottom of the range
    assert float(canvas[0, 0, :, 500:].max()) < 0.05
    # the same through load_guide_canvas
    torch.testing.assert_close(codec.load_guide_canvas(guide_audio=str(path)), canvas)


@pytest.mark.parametrize("size,mode", [((300, 200), "RGB"), ((1024, 256), "RGB"), ((64, 640), "L"), ((50, 50), "RGBA")])
def test_image_to_canvas_any_size(size, mode):
    rng = np.random.default_rng(5)
    array = rng.integers(0, 256, size=(size[1], size[0], len(mode)) if mode != "L" else (size[1], size[0]),
                         dtype=np.uint8)
    canvas = codec.image_to_canvas(Image.fromarray(array, mode))
    assert canvas.shape == (1, 3, 256, 1024)
    assert float(canvas.min()) >= 0 and float(canvas.max()) <= 1
    assert torch.equal(canvas[:, 0], canvas[:, 1]) and torch.equal(canvas[:, 0], canvas[:, 2])


def test_image_to_canvas_keeps_the_picture_upright_and_levels(tmp_path):
    array = np.zeros((200, 300, 3), dtype=np.uint8)
    array[:100] = 255  # white top half, black bottom half
    image = Image.fromarray(array, "RGB")
    canvas = codec.image_to_canvas(image)[0, 0]
    assert float(canvas[:100].mean()) > 0.95
    assert float(canvas[-100:].mean()) < 0.05
    path = tmp_path / "guide.png"
    image.save(path)
    torch.testing.assert_close(codec.load_guide_canvas(guide_image=str(path)), codec.image_to_canvas(image))


def test_read_audio_of_garbage_raises(tmp_path):
    path = tmp_path / "not-audio.wav"
    path.write_bytes(b"this is not a sound file" * 100)
    with pytest.raises(Exception):
        codec.read_audio(str(path))


def test_read_audio_of_empty_sound_raises(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(ValueError):
        codec.read_audio(str(path))


def test_read_image_of_garbage_raises(tmp_path):
    path = tmp_path / "not-an-image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    with pytest.raises(Exception):
        codec.read_image(str(path))


def test_to_uint8():
    x = torch.tensor([[-0.5, 0.0, 0.5, 1.0, 2.0]])
    assert codec.to_uint8(x).tolist() == [[0, 0, 128, 255, 255]]
