"""The CLIP and CLAP scorers of candidates (docs/algorithm.md, "Ranking the candidates").

- CLIP score: the picture against the image prompt; the 256 x W canvas is cut into 256 x 256 windows with
  stride 32, cosine similarity per window, averaged.
- CLAP score: the sound against the audio prompt, as the reference evaluator (images-that-sound's
  `src/evaluator/clap.py`) scores it: 16 kHz -> 48 kHz, peak-normalised to 1 (`librosa.util.normalize`'s
  default), cosine similarity, clamped at 0. Only the first 10 s are scored (CLAP's window; a sound of the
  default 992 columns lasts 9.92 s, so nothing is cut): a deterministic crop where the feature extractor's
  `rand_trunc` would take a random 10 s.

Every text is truncated to what its model's text encoder takes (CLIP 77 tokens; CLAP 512 for the real
RoBERTa's 514 positions), so a long prompt is scored on its start instead of failing.
"""

from __future__ import annotations

import numpy as np

WINDOW = 256
STRIDE = 32
CLAP_RATE = 48_000
CLAP_MAX_SECONDS = 10.0


class _Scorer:
    """A transformers dual-encoder (`MODEL` / `PROCESSOR` class names) loaded with from_pretrained, and its text."""

    MODEL = PROCESSOR = ""

    def __init__(self, model_id: str, device="cpu", dtype=None):
        import torch
        import transformers

        self.device = torch.device(device)
        model_cls, processor_cls = getattr(transformers, self.MODEL), getattr(transformers, self.PROCESSOR)
        self.model = model_cls.from_pretrained(model_id, dtype=dtype or torch.float32).to(self.device).eval()
        self.processor = processor_cls.from_pretrained(model_id)

    def text_embedding(self, text: str):
        """The unit text embedding, the text truncated to what the model's text encoder takes."""
        text_in = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True,
                                 max_length=text_window(self.model.config.text_config, self.processor.tokenizer))
        return _unit(_tensor(self.model.get_text_features(**{k: v.to(self.device) for k, v in text_in.items()})))


class ClipScorer(_Scorer):
    """CLIP score of grayscale pictures [256, W] against one text, through transformers' CLIPModel."""

    MODEL, PROCESSOR = "CLIPModel", "CLIPProcessor"

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
            text_emb = self.text_embedding(text)
            for image in images:
                crops = [Image.fromarray(w).convert("RGB") for w in self.windows(image)]
                pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"]
                emb = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
                scores.append(float((_unit(_tensor(emb)) @ text_emb.T).mean()))
        return np.asarray(scores, dtype=np.float64)


class ClapScorer(_Scorer):
    """CLAP score of 16 kHz sounds against one text, through transformers' ClapModel."""

    MODEL, PROCESSOR = "ClapModel", "ClapProcessor"

    @staticmethod
    def to_48k(audio: np.ndarray) -> np.ndarray:
        """16 kHz -> 48 kHz, peak-normalised to 1 as the reference evaluator does, cut to the first 10 s (CLAP's
        window, so no random crop happens inside the extractor)."""
        from scipy.signal import resample_poly

        up = resample_poly(np.asarray(audio, dtype=np.float64), 3, 1)
        peak = np.abs(up).max() if up.size else 0.0
        if peak > 0:
            up = up / peak
        return up[: int(CLAP_RATE * CLAP_MAX_SECONDS)].astype(np.float32)

    def __call__(self, audios: list[np.ndarray], text: str) -> np.ndarray:
        import torch

        with torch.no_grad():
            text_emb = self.text_embedding(text)
            audio_in = self.processor(audio=[self.to_48k(a) for a in audios], sampling_rate=CLAP_RATE,
                                      return_tensors="pt")
            audio_emb = _unit(_tensor(self.model.get_audio_features(
                **{k: v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device)
                   for k, v in audio_in.items()})))
            return (audio_emb @ text_emb.T)[:, 0].clamp_min(0).double().cpu().numpy()


def text_window(text_config, tokenizer) -> int:
    """The most tokens a text model takes: its tokenizer's limit, and its position embeddings (RoBERTa's
    positions start after the padding index, so CLAP's 514 positions hold 512 tokens)."""
    positions = int(text_config.max_position_embeddings)
    if getattr(text_config, "model_type", "") in ("clap_text_model", "roberta"):
        positions -= int(text_config.pad_token_id) + 1
    limit = getattr(tokenizer, "model_max_length", positions) or positions
    return int(min(positions, limit))


def _tensor(out):
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return out if hasattr(out, "norm") else out.pooler_output


def _unit(x):
    return (x / x.norm(dim=-1, keepdim=True)).float()
