"""Loading Auffusion's HiFi-GAN vocoder from its on-disk format (docs/algorithm.md, "Canvas <-> spectrogram <-> waveform").

A reference generator is built with torch's own old-style weight norm (`torch.nn.utils.weight_norm` on every
conv, giving `weight_g` / `weight_v` state-dict keys, as Auffusion's `vocoder.pt` holds them) and saved as
`vocoder/config.json` + `vocoder/vocoder.pt` ({"generator": state_dict}). Checks that `load_vocoder` reproduces
the reference's output with weight norm folded away, that the output is frames * 160 samples in [-1, 1], that
the "2" residual-block variant loads, that `save_vocoder` writes the same format back, and that a broken
checkpoint fails loudly.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from pws_batch.core.vocoder import HifiGanGenerator, load_vocoder, save_vocoder

FRAMES = 12

# HiFi-GAN V1's keys and Auffusion's upsampling (5*4*2*2*2 = 160 = the hop), small channels for speed
CONFIG_V1 = {
    "resblock": "1",
    "num_mels": 256,
    "upsample_rates": [5, 4, 2, 2, 2],
    "upsample_kernel_sizes": [11, 8, 4, 4, 4],
    "upsample_initial_channel": 64,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "sampling_rate": 16000,
}
CONFIG_V2 = {**CONFIG_V1, "resblock": "2", "upsample_initial_channel": 32,
             "resblock_kernel_sizes": [3, 5, 7], "resblock_dilation_sizes": [[1, 2], [2, 6], [3, 12]]}


def weight_normed_reference(config: dict, seed: int = 0) -> HifiGanGenerator:
    """A generator with torch's old-style weight norm on every conv, and g != ||v|| so that folding matters."""
    torch.manual_seed(seed)
    model = HifiGanGenerator(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
                module.weight.mul_(2.0)  # loud enough to reach tanh's curved part (default init is very quiet)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.05)
    for module in list(model.modules()):
        if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
            torch.nn.utils.weight_norm(module)
            with torch.no_grad():
                module.weight_g.mul_(0.5 + torch.rand(module.weight_g.shape, generator=g))
    return model.eval()


def write_checkpoint(folder, config: dict, state_dict: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    torch.save({"generator": state_dict}, os.path.join(folder, "vocoder.pt"))


def logmel(batch: int = 2, frames: int = FRAMES, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 256, frames, generator=g) * 2.0 - 4.0


def reference_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.fixture(params=[CONFIG_V1, CONFIG_V2], ids=["resblock1", "resblock2"])
def checkpoint(request, tmp_path):
    config = request.param
    reference = weight_normed_reference(config)
    state = reference.state_dict()
    assert any(k.endswith(".weight_g") for k in state) and any(k.endswith(".weight_v") for k in state)
    assert not any(k.endswith(".weight") for k in state)  # every conv is weight-normed, as Auffusion ships it
    write_checkpoint(tmp_path / "vocoder", config, state)
    return tmp_path, config, reference


def test_load_vocoder_matches_the_weight_normed_reference(checkpoint):
    root, config, reference = checkpoint
    vocoder = load_vocoder(str(root), "vocoder")
    x = logmel()
    expected = reference_output(reference, x)
    out = vocoder(x)
    assert out.shape == (2, FRAMES * 160)
    assert float(expected.abs().max()) > 0.05  # the reference really produces sound
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert float(out.abs().max()) <= 1.0
    assert float(out.abs().max()) > 0.5  # tanh is exercised, not only its linear part

    # the test is sensitive to the folding: ignoring weight_g (weight = v) gives another output
    ignoring_g = HifiGanGenerator(config)
    ignoring_g.load_state_dict({k.replace(".weight_v", ".weight"): v for k, v in reference.state_dict().items()
                                if not k.endswith(".weight_g")})
    assert float((reference_output(ignoring_g.eval(), x) - expected).abs().max()) > 1e-2


def test_loaded_vocoder_has_plain_weights_only(checkpoint):
    root, _, _ = checkpoint
    vocoder = load_vocoder(str(root), "vocoder")
    names = [n for n, _ in vocoder.named_parameters()] + list(vocoder.state_dict())
    assert not any(n.endswith(("weight_g", "weight_v")) for n in names)
    convs = [m for m in vocoder.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]
    assert convs
    for m in convs:
        assert isinstance(m.weight, nn.Parameter)
        assert not m._forward_pre_hooks  # no weight-norm hook recomputing the weight at every call
    assert not vocoder.training
    assert all(not p.requires_grad for p in vocoder.parameters())


def test_output_length_and_range_for_any_frame_count(checkpoint):
    root, _, _ = checkpoint
    vocoder = load_vocoder(str(root), "vocoder")
    assert vocoder.hop_length == 160
    for frames in (1, 7, 32):
        with torch.no_grad():
            out = vocoder(logmel(batch=1, frames=frames, seed=frames) * 3)
        assert out.shape == (1, frames * 160)
        assert float(out.abs().max()) <= 1.0 and torch.isfinite(out).all()


def test_load_vocoder_dtype_and_device(checkpoint):
    root, _, reference = checkpoint
    vocoder = load_vocoder(str(root), "vocoder", device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in vocoder.parameters())
    x = logmel()
    torch.testing.assert_close(vocoder(x.double()).float(), reference_output(reference, x), rtol=1e-4, atol=1e-5)


def test_save_then_load_round_trip(checkpoint, tmp_path):
    root, config, reference = checkpoint
    vocoder = load_vocoder(str(root), "vocoder")
    copy = tmp_path / "copy"
    save_vocoder(vocoder, str(copy / "vocoder"))

    # the written files are Auffusion's format: config.json + {"generator": weight-normed state dict}
    with open(copy / "vocoder" / "config.json") as f:
        assert {k: v for k, v in json.load(f).items() if k in config} == config
    saved = torch.load(copy / "vocoder" / "vocoder.pt", weights_only=True)
    assert set(saved) == {"generator"}
    assert set(saved["generator"]) == set(reference.state_dict())

    # torch's own weight-normed module reads it back and agrees
    fresh = weight_normed_reference(config, seed=99)
    fresh.load_state_dict(saved["generator"])
    x = logmel()
    torch.testing.assert_close(reference_output(fresh, x), reference_output(reference, x), rtol=1e-5, atol=1e-5)

    again = load_vocoder(str(copy), "vocoder")
    torch.testing.assert_close(again(x), vocoder(x), rtol=1e-5, atol=1e-5)
    for key, value in vocoder.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=1e-5, atol=1e-7)


def test_load_vocoder_from_folder_without_subfolder(checkpoint):
    root, _, reference = checkpoint
    vocoder = load_vocoder(str(root / "vocoder"), "")
    x = logmel()
    torch.testing.assert_close(vocoder(x), reference_output(reference, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("missing", ["conv_post.bias", "ups.0.weight_g", "resblocks.4.convs1.1.weight_v",
                                     "conv_pre.weight_g+conv_pre.weight_v"])
def test_checkpoint_with_a_missing_key_fails_loudly(tmp_path, missing):
    reference = weight_normed_reference(CONFIG_V1)
    state = reference.state_dict()
    for key in missing.split("+"):
        assert key in state
        del state[key]
    write_checkpoint(tmp_path / "vocoder", CONFIG_V1, state)
    first = missing.split("+")[0].rsplit(".", 1)[0]  # the module whose weights are incomplete
    with pytest.raises((RuntimeError, KeyError), match=first.replace(".", r"\.")):
        load_vocoder(str(tmp_path), "vocoder")


def test_checkpoint_with_an_unexpected_key_fails(tmp_path):
    state = weight_normed_reference(CONFIG_V1).state_dict()
    state["extra.bias"] = torch.zeros(3)
    write_checkpoint(tmp_path / "vocoder", CONFIG_V1, state)
    with pytest.raises(RuntimeError, match="extra"):
        load_vocoder(str(tmp_path), "vocoder")


def test_checkpoint_for_another_architecture_fails(tmp_path):
    state = weight_normed_reference(CONFIG_V1).state_dict()
    write_checkpoint(tmp_path / "vocoder", {**CONFIG_V1, "upsample_initial_channel": 32}, state)
    with pytest.raises(RuntimeError):
        load_vocoder(str(tmp_path), "vocoder")


def test_missing_files_fail(tmp_path):
    (tmp_path / "vocoder").mkdir()
    with open(tmp_path / "vocoder" / "config.json", "w") as f:
        json.dump(CONFIG_V1, f)
    with pytest.raises(FileNotFoundError, match="vocoder.pt"):
        load_vocoder(str(tmp_path), "vocoder")


def reference_generator_with_auffusion_upsampling(config: dict, seed: int = 0) -> HifiGanGenerator:
    """The reference converter's rule (Auffusion / images-that-sound `Generator`): an upsampling layer whose
    kernel minus rate is odd gets padding (k - u) // 2 + 1 and output_padding 1, so every layer multiplies the
    length by exactly its rate. Weights are shaped as usual, so the same checkpoint fits both."""
    model = weight_normed_reference(config, seed)
    for i, (u, k) in enumerate(zip(config["upsample_rates"], config["upsample_kernel_sizes"])):
        if (k - u) % 2:
            old = model.ups[i]
            torch.nn.utils.remove_weight_norm(old)
            new = nn.ConvTranspose1d(old.in_channels, old.out_channels, k, u, padding=(k - u) // 2 + 1,
                                     output_padding=1)
            new.load_state_dict(old.state_dict())
            model.ups[i] = torch.nn.utils.weight_norm(new)
    return model.eval()


# AudioLDM's 16 kHz / hop-160 HiFi-GAN layout, where 16 - 5 = 11 is odd
CONFIG_ODD = {**CONFIG_V1, "upsample_kernel_sizes": [16, 16, 8, 4, 4], "upsample_initial_channel": 32}


def test_odd_kernel_minus_rate_keeps_frames_times_hop(tmp_path):
    reference = reference_generator_with_auffusion_upsampling(CONFIG_ODD)
    write_checkpoint(tmp_path / "vocoder", CONFIG_ODD, reference.state_dict())
    vocoder = load_vocoder(str(tmp_path), "vocoder")
    x = logmel()
    expected = reference_output(reference, x)
    assert expected.shape == (2, FRAMES * 160)
    out = vocoder(x)
    assert out.shape == (2, FRAMES * 160)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
