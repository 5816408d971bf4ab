"""Scoring and ranking candidates (ALGORITHM.md, "Ranking the candidates").

- CLIP score: the picture against the image prompt; the 256 x W canvas is cut into 256 x 256 windows with
  stride 32, cosine similarity per window, averaged.
- CLAP score: the sound against the audio prompt; 16 kHz -> 48 kHz, cosine similarity, clamped at 0.
- Rules that turn the two scores into one order: the reference's (candidates in the top fraction by BOTH
  scores first), a weighted sum of min-max normalised scores, and Pareto rank. Every rule gives a full order
  (rank 1 = best) so `keep` can be any number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

WINDOW = 256
STRIDE = 32
CLAP_RATE = 48_000
CLAP_MAX_SECONDS = 10.0
RULES = ("reference", "weighted", "pareto")


# ---------------------------------------------------------------------------------------------- scorers
class ClipScorer:
    """CLIP score of grayscale pictures [256, W] against one text, through transformers' CLIPModel."""

    def __init__(self, model_id: str, device="cpu", dtype=None):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(model_id, dtype=dtype or torch.float32).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(model_id)

    @staticmethod
    def windows(image: np.ndarray) -> list[np.ndarray]:
        """256 x 256 windows with stride 32 across the width (25 for a 256 x 1024 canvas)."""
        width = image.shape[1]
        starts = list(range(0, max(width - WINDOW, 0) + 1, STRIDE))
        return [image[:, s:s + WINDOW] for s in starts]

    def __call__(self, images: list[np.ndarray], text: str) -> np.ndarray:
        import torch
        from PIL import Image

        scores = []
        with torch.no_grad():
            text_in = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True)
            text_emb = self.model.get_text_features(**{k: v.to(self.device) for k, v in text_in.items()})
            text_emb = _unit(_tensor(text_emb))
            for image in images:
                crops = [Image.fromarray(w).convert("RGB") for w in self.windows(image)]
                pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"]
                emb = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
                scores.append(float((_unit(_tensor(emb)) @ text_emb.T).mean()))
        return np.asarray(scores, dtype=np.float64)


class ClapScorer:
    """CLAP score of 16 kHz sounds against one text, through transformers' ClapModel."""

    def __init__(self, model_id: str, device="cpu", dtype=None):
        import torch
        from transformers import ClapModel, ClapProcessor

        self.device = torch.device(device)
        self.model = ClapModel.from_pretrained(model_id, dtype=dtype or torch.float32).to(self.device).eval()
        self.processor = ClapProcessor.from_pretrained(model_id)

    @staticmethod
    def to_48k(audio: np.ndarray) -> np.ndarray:
        """16 kHz -> 48 kHz, cut to 10 s (CLAP's window, so no random crop happens inside the extractor)."""
        from scipy.signal import resample_poly

        up = resample_poly(np.asarray(audio, dtype=np.float64), 3, 1).astype(np.float32)
        return up[: int(CLAP_RATE * CLAP_MAX_SECONDS)]

    def __call__(self, audios: list[np.ndarray], text: str) -> np.ndarray:
        import torch

        with torch.no_grad():
            text_in = self.processor(text=[text], return_tensors="pt", padding=True)
            text_emb = _unit(_tensor(self.model.get_text_features(
                **{k: v.to(self.device) for k, v in text_in.items()})))
            audio_in = self.processor(audio=[self.to_48k(a) for a in audios], sampling_rate=CLAP_RATE,
                                      return_tensors="pt")
            audio_emb = _unit(_tensor(self.model.get_audio_features(
                **{k: v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device)
                   for k, v in audio_in.items()})))
            return (audio_emb @ text_emb.T)[:, 0].clamp_min(0).double().cpu().numpy()


def _tensor(out):
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return out if hasattr(out, "norm") else out.pooler_output


def _unit(x):
    return (x / x.norm(dim=-1, keepdim=True)).float()


# ---------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class RankingRule:
    """How two scores become one order. `top_fraction` is the reference rule's; weights the weighted sum's."""

    name: str = "reference"
    top_fraction: float = 0.2
    clip_weight: float = 0.5
    clap_weight: float = 0.5

    def __post_init__(self):
        if self.name not in RULES:
            raise ValueError(f"unknown ranking rule {self.name!r}: use one of {', '.join(RULES)}")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"top fraction must be in (0, 1], got {self.top_fraction}")
        weights = (self.clip_weight, self.clap_weight)
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) == 0:
            raise ValueError(f"ranking weights must be finite, >= 0 and not both 0, got {weights}")


def normalise(x: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] within one pair's candidates (all equal -> all 0)."""
    x = np.asarray(x, dtype=np.float64)
    span = x.max() - x.min() if x.size else 0.0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def top_set(x: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the top `fraction` (at least one) by x."""
    k = max(1, int(round(len(x) * fraction)))
    mask = np.zeros(len(x), dtype=bool)
    mask[np.argsort(-x, kind="stable")[:k]] = True
    return mask


def pareto_fronts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-dominated sorting: front 0 is the Pareto set of (a, b), both to maximise."""
    n = len(a)
    front = np.full(n, -1)
    remaining = set(range(n))
    level = 0
    while remaining:
        current = [i for i in remaining
                   if not any(a[j] >= a[i] and b[j] >= b[i] and (a[j] > a[i] or b[j] > b[i]) for j in remaining)]
        for i in current:
            front[i] = level
            remaining.discard(i)
        level += 1
    return front


def rank_candidates(clip: np.ndarray, clap: np.ndarray, rule: RankingRule = RankingRule()) -> np.ndarray:
    """1-based ranks (1 = best) of every candidate under `rule`; ties keep candidate order."""
    clip, clap = np.asarray(clip, dtype=np.float64), np.asarray(clap, dtype=np.float64)
    combined = rule.clip_weight * normalise(clip) + rule.clap_weight * normalise(clap)
    if rule.name == "weighted":
        primary = np.zeros(len(clip))
    elif rule.name == "reference":  # in the top fraction by both scores first
        primary = (~(top_set(clip, rule.top_fraction) & top_set(clap, rule.top_fraction))).astype(float)
    else:  # pareto
        primary = pareto_fronts(clip, clap).astype(float)
    order = np.lexsort((np.arange(len(clip)), -combined, primary))
    ranks = np.empty(len(clip), dtype=np.int64)
    ranks[order] = np.arange(1, len(clip) + 1)
    return ranks
