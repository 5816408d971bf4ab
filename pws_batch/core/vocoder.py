"""Auffusion's vocoder: a HiFi-GAN V1-style generator, loaded from the real `vocoder/` folder layout.

On disk: `config.json` with HiFi-GAN's keys (`resblock`, `num_mels`, `upsample_rates`, ...) and `vocoder.pt`
holding `{"generator": state_dict}` with old-style weight-norm keys (`weight_g`, `weight_v`). Weight norm is
folded into plain weights at load time (its removal), so inference runs plain convolutions.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

LRELU_SLOPE = 0.1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "vocoder.pt"


def _padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class ResBlock1(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilation: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d,
                                              padding=_padding(kernel_size, d)) for d in dilation)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, 1, dilation=1,
                                              padding=_padding(kernel_size)) for _ in dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class ResBlock2(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilation: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d,
                                             padding=_padding(kernel_size, d)) for d in dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = x + c(F.leaky_relu(x, LRELU_SLOPE))
        return x


class HifiGanGenerator(nn.Module):
    """HiFi-GAN V1 generator (Kong et al. 2020), module names as in the reference so state dicts match."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        rates, kernels = config["upsample_rates"], config["upsample_kernel_sizes"]
        ch0 = config["upsample_initial_channel"]
        self.num_kernels = len(config["resblock_kernel_sizes"])
        self.conv_pre = nn.Conv1d(config["num_mels"], ch0, 7, 1, padding=3)
        # As Auffusion's generator: an odd (kernel - rate) pads one more and adds output_padding, so every
        # layer upsamples exactly by its rate (e.g. AudioLDM-style kernels 16 with rate 5).
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(ch0 // 2 ** i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            if (k - u) % 2 == 0 else
            nn.ConvTranspose1d(ch0 // 2 ** i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2 + 1, output_padding=1)
            for i, (u, k) in enumerate(zip(rates, kernels)))
        block = ResBlock1 if str(config["resblock"]) == "1" else ResBlock2
        self.resblocks = nn.ModuleList(
            block(ch0 // 2 ** (i + 1), k, tuple(d))
            for i in range(len(self.ups))
            for k, d in zip(config["resblock_kernel_sizes"], config["resblock_dilation_sizes"]))
        self.conv_post = nn.Conv1d(ch0 // 2 ** len(self.ups), 1, 7, 1, padding=3)

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.config["upsample_rates"]:
            hop *= r
        return hop

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        """[B, num_mels, F] log-mel -> [B, F * hop] waveform in [-1, 1]."""
        x = self.conv_pre(logmel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(b(x) for b in blocks) / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))  # the reference uses leaky_relu's default slope here
        return torch.tanh(x).squeeze(1)


def _norm_except_dim0(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def fold_weight_norm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`x.weight_g`, `x.weight_v` -> `x.weight = g * v / ||v||` (norm over all but dim 0, weight_norm's default)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".weight_g"):
            continue
        if key.endswith(".weight_v"):
            base = key[: -len("_v")]
            g = state_dict[base + "_g"]
            out[base] = g * value / _norm_except_dim0(value)
        else:
            out[key] = value
    return out


def unfold_weight_norm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `fold_weight_norm`: plain conv weights -> old-style `weight_g` / `weight_v` pairs."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".weight") and value.dim() == 3:
            out[key + "_g"] = _norm_except_dim0(value).clone()
            out[key + "_v"] = value.clone()
        else:
            out[key] = value
    return out


def _resolve_folder_files(name_or_path: str, subfolder: str) -> tuple[str, str]:
    """Local paths of config.json and vocoder.pt: from a local folder, or from the Hugging Face cache/hub."""
    folder = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
    if os.path.isdir(name_or_path):
        config, weights = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
        for path in (config, weights):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} does not exist")
        return config, weights
    from huggingface_hub import hf_hub_download  # honours HF_HUB_OFFLINE and the local cache

    return (hf_hub_download(name_or_path, CONFIG_NAME, subfolder=subfolder or None),
            hf_hub_download(name_or_path, WEIGHTS_NAME, subfolder=subfolder or None))


def _load_checkpoint(path: str) -> Any:
    """torch.load(weights_only=True), with a damaged or foreign file reported as what it is: not a valid torch
    checkpoint. (torch's own message suggests weights_only=False, unsafe advice for a file of unknown origin.)"""
    import pickle

    from pws_batch.core.model_files import torch_file_problem, weights_only_reason

    problem = torch_file_problem(path)
    if problem:
        detail = problem.removeprefix("not a valid torch checkpoint: ")  # said once
        raise ValueError(f"{path} is not a valid torch checkpoint: {detail}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(f"{path} is not a valid torch checkpoint: torch.load(weights_only=True) cannot read it "
                         f"({weights_only_reason(exc)})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a valid vocoder checkpoint: it holds a {type(checkpoint).__name__}, not a "
                         f"state dict")
    return checkpoint


def load_vocoder(name_or_path: str, subfolder: str = "vocoder", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> HifiGanGenerator:
    """Load Auffusion's vocoder from a hub id or local folder (safe `weights_only` unpickling)."""
    config_path, weights_path = _resolve_folder_files(name_or_path, subfolder)
    with open(config_path) as f:
        config = json.load(f)
    checkpoint = _load_checkpoint(weights_path)
    state = checkpoint["generator"] if "generator" in checkpoint else checkpoint
    model = HifiGanGenerator(config)
    model.load_state_dict(fold_weight_norm(state))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_vocoder(model: HifiGanGenerator, folder: str) -> None:
    """Write `config.json` + `vocoder.pt` ({"generator": weight-normed state dict}) as Auffusion ships them."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(model.config, f, indent=2)
    state = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    torch.save({"generator": unfold_weight_norm(state)}, os.path.join(folder, WEIGHTS_NAME))
