"""One prompt pair -> N candidate images that sound.

Follows diffusers' `StableDiffusionPipeline.__call__`: components passed in, one readable call with numbered
steps (check inputs, encode prompts, prepare timesteps and latents, denoise, decode). The math of each step
lives in `pws_batch.core.sampler`; the canvas / audio format in `pws_batch.core.codec`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from pws_batch.core import codec, sampler
from pws_batch.core.schedule import checked_timesteps, make_scheduler
from pws_batch.core.models import (ModelSet, load_diffusion_pipeline, load_vocoder,
                              resolve_model_set)
from pws_batch.core.device import resolve_device, resolve_dtype
from pws_batch.core.params import VOCODERS, GenerationParams, check_guides, check_params, raise_for_problems

def check_request(params: GenerationParams, scheduler_config: dict) -> tuple[list[float], int]:
    """Every check that needs no model weights: fields, guide files, the schedule (raises).

    Returns the timesteps the request runs and T.
    """
    raise_for_problems(check_params(params) + check_guides(params))
    return checked_timesteps(params, scheduler_config)


@dataclass
class Candidate:
    index: int
    seed: int
    image: np.ndarray  # uint8 [256, W]: the picture, decoded by the image model's VAE, grayscale
    audio: np.ndarray  # float32 [W * 160] at 16 kHz


@dataclass
class GenerationResult:
    params: GenerationParams
    candidates: list[Candidate]
    unet_evals: dict[str, int]  # per model, summed over candidates
    unet_evals_minimum: int  # what the schedule needs, summed over candidates
    timings: dict[str, float] = field(default_factory=dict)


class ImagesThatSoundPipeline:
    """Holds both diffusion models, the vocoder and the scheduler config; makes candidates for one pair."""

    loads = 0  # model sets loaded by `from_model_set` in this process (an actor must load once, not per pair)

    def __init__(self, image_pipe: Any, audio_pipe: Any, vocoder: torch.nn.Module | None, model_set: ModelSet,
                 device: torch.device, dtype: torch.dtype, scheduler_config: dict):
        self.image_pipe = image_pipe
        self.audio_pipe = audio_pipe
        self.vocoder = vocoder  # None: Griffin-Lim
        self.model_set = model_set
        self.device = device
        self.dtype = dtype
        self.scheduler_config = scheduler_config
        for pipe in (image_pipe, audio_pipe):
            _use_sdpa(pipe.unet)

    @classmethod
    def from_model_set(cls, model_set: ModelSet | str, device: str = "auto", dtype: str = "auto",
                       vocoder: str = "hifigan") -> "ImagesThatSoundPipeline":
        if isinstance(model_set, str):
            model_set = resolve_model_set(model_set)
        if vocoder not in VOCODERS:
            raise ValueError(f"unknown vocoder {vocoder!r}: use one of {', '.join(VOCODERS)}")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        image_pipe = load_diffusion_pipeline("image", model_set.image, dev, dt)
        audio_pipe = load_diffusion_pipeline("audio", model_set.audio, dev, dt)
        voc = load_vocoder(model_set, dev, torch.float32) if vocoder == "hifigan" else None
        cls.loads += 1
        return cls(image_pipe, audio_pipe, voc, model_set, dev, dt, dict(image_pipe.scheduler.config))

    # -------------------------------------------------------------------------------- building blocks
    @torch.no_grad()
    def encode_prompt(self, pipe: Any, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) embeddings [1, 77, dim] through the model's own tokenizer and text encoder."""
        tokens = pipe.tokenizer([prompt, negative], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        embeddings = pipe.text_encoder(tokens.input_ids.to(self.device))[0].to(self.dtype)
        return embeddings[:1], embeddings[1:]

    def branches(self, params: GenerationParams) -> list[sampler.Branch]:
        """Prompt embeddings are computed here, once per pair, never per step."""
        image_cond, image_uncond = self.encode_prompt(self.image_pipe, params.effective_image_prompt,
                                                      params.negative_image_prompt)
        audio_cond, audio_uncond = self.encode_prompt(self.audio_pipe, params.audio_prompt,
                                                      params.negative_audio_prompt)
        return [
            sampler.Branch("image", self.image_pipe.unet, image_cond, image_uncond, params.guidance_image,
                           params.t_image, params.weight_image),
            sampler.Branch("audio", self.audio_pipe.unet, audio_cond, audio_uncond, params.guidance_audio,
                           params.t_audio, params.weight_audio),
        ]

    @torch.no_grad()
    def guide_latent(self, params: GenerationParams) -> torch.Tensor | None:
        """The guide's latent: a sound through the audio model's VAE, a picture through the image model's."""
        canvas = codec.load_guide_canvas(params.guide_audio, params.guide_image)
        if canvas is None:
            return None
        vae = (self.audio_pipe if params.guide_audio else self.image_pipe).vae
        posterior = vae.encode((canvas * 2 - 1).to(self.device, self.dtype)).latent_dist
        return posterior.mode().float() * vae.config.scaling_factor

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """Each candidate's noise from its own CPU generator seeded with its seed: the same on any device."""
        channels = self.image_pipe.unet.config.in_channels
        factor = 2 ** (len(self.image_pipe.vae.config.block_out_channels) - 1)
        shape = (1, channels, codec.CANVAS_HEIGHT // factor, codec.CANVAS_WIDTH // factor)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
        return torch.cat(noise).to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, crop_columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Final latents -> (picture [B, 256, W] by the image VAE, spectrogram canvas [B, 3, 256, W] by the audio VAE)."""
        def run(vae):
            out = vae.decode((latents / vae.config.scaling_factor).to(self.dtype)).sample.float()
            canvas = (out / 2 + 0.5).clamp(0, 1)
            return canvas[..., : canvas.shape[-1] - crop_columns]

        return run(self.image_pipe.vae).mean(dim=1), run(self.audio_pipe.vae)

    @torch.no_grad()
    def vocode(self, spectrogram_canvas: torch.Tensor, seeds: list[int] | None = None) -> torch.Tensor:
        """Spectrogram canvases -> 16 kHz sounds; Griffin-Lim draws each one's initial phase from its seed."""
        logmel = codec.canvas_to_logmel(spectrogram_canvas)
        if self.vocoder is None:
            return codec.griffin_lim(logmel.cpu(), seeds=seeds)
        return self.vocoder(logmel.to(self.device, next(self.vocoder.parameters()).dtype)).float()

    # -------------------------------------------------------------------------------- the loop
    @torch.no_grad()
    def denoise_latents(self, params: GenerationParams, seeds: list[int], *, micro_batch: int = 8,
                        skip_inactive: bool = True, evals: Counter | None = None,
                        branches: list[sampler.Branch] | None = None, guide: torch.Tensor | None = None,
                        on_batch: Callable[[list[int], torch.Tensor], None] | None = None,
                        on_step: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Denoise the candidates `seeds` together, `micro_batch` at a time. Returns final latents per micro-batch."""
        branches = branches if branches is not None else self.branches(params)
        if guide is None and (params.guide_audio or params.guide_image):
            guide = self.guide_latent(params)
        out = []
        for start in range(0, len(seeds), micro_batch):
            batch_seeds = seeds[start:start + micro_batch]
            scheduler = make_scheduler(params.scheduler, self.scheduler_config)  # fresh state per batch
            timesteps = sampler.run_timesteps(scheduler, params.steps, params.run_strength, self.device)
            T = int(scheduler.config.num_train_timesteps)
            z = sampler.initial_latents(self.initial_noise(batch_seeds), scheduler, timesteps, guide)
            z = sampler.denoise(z, timesteps, scheduler, branches, T, skip_inactive=skip_inactive, evals=evals,
                                callback=on_step)
            if on_batch is not None:
                on_batch(batch_seeds, z)
            out.append(z)
        return out

    def __call__(self, params: GenerationParams, *, micro_batch: int = 8, skip_inactive: bool = True,
                 on_step: Callable[[int], None] | None = None, seeds: list[int] | None = None,
                 on_candidates: Callable[[list[Candidate]], None] | None = None) -> GenerationResult:
        """The pair's candidates; `seeds` (default: all of `params.candidate_seeds`): only these candidates, each
        still numbered seed - params.seed (a stream of micro-batches makes a pair piece by piece).
        `on_candidates` is handed each micro-batch's candidates as soon as they are made (`generate` writes their
        files there, so that Ctrl-C keeps them); its time is timings' write_s, not counted in denoise_s."""
        timings: Counter = Counter()
        clock = time.perf_counter()

        # 1. Check inputs (no work is done for a request that would fail).
        timesteps, T = check_request(params, self.scheduler_config)

        # 2. Encode prompts and the guide, once for all candidates.
        branches = self.branches(params)
        guide = self.guide_latent(params)
        timings["encode_s"] += time.perf_counter() - clock

        # 3-5. Prepare latents, denoise, decode: one micro-batch at a time so big N fits in memory.
        candidates: list[Candidate] = []
        evals: Counter = Counter()
        seeds = params.candidate_seeds if seeds is None else list(seeds)

        def finish(batch_seeds: list[int], z: torch.Tensor) -> None:
            check_finite("the denoised latents", z, batch_seeds, params)
            t0 = time.perf_counter()
            picture, spectrogram = self.decode(z, params.crop_columns)
            check_finite("the decoded picture", picture, batch_seeds, params)
            check_finite("the decoded spectrogram", spectrogram, batch_seeds, params)
            t1 = time.perf_counter()
            audio = self.vocode(spectrogram, batch_seeds)
            check_finite("the vocoded sound", audio, batch_seeds, params)
            audio = audio.cpu().numpy()
            timings["decode_s"] += t1 - t0
            timings["vocode_s"] += time.perf_counter() - t1
            images = codec.to_uint8(picture)
            made = [Candidate(seed - params.seed, seed, images[j], audio[j]) for j, seed in enumerate(batch_seeds)]
            candidates.extend(made)
            if on_candidates is not None:
                t2 = time.perf_counter()
                on_candidates(made)
                timings["write_s"] += time.perf_counter() - t2

        t_denoise = time.perf_counter()
        self.denoise_latents(params, seeds, micro_batch=micro_batch, skip_inactive=skip_inactive, evals=evals,
                             branches=branches, guide=guide, on_batch=finish, on_step=on_step)
        timings["denoise_s"] = (time.perf_counter() - t_denoise - timings["decode_s"] - timings["vocode_s"]
                                - timings["write_s"])
        timings["total_s"] = time.perf_counter() - clock
        minimum = sampler.minimum_unet_evals(timesteps, branches, T) * len(seeds)
        return GenerationResult(params, candidates, dict(evals), minimum, {k: round(v, 4) for k, v in timings.items()})


class NonFiniteError(ValueError):
    """Denoising or decoding gave NaN or infinite values: the pair fails, nothing of it is kept."""


def check_finite(what: str, x: torch.Tensor, seeds: list[int], params: GenerationParams) -> None:
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        bad = [seed for seed, ok in zip(seeds, finite.tolist()) if not ok]
        raise NonFiniteError(
            f"{what} hold NaN or infinite values (candidate seeds {bad[:5]}{' ...' if len(bad) > 5 else ''}) with "
            f"guidance {params.guidance_image:g}/{params.guidance_audio:g} and weights "
            f"{params.weight_image:g}/{params.weight_audio:g}; lower the guidance (the reference uses 7.5-10)"
            f"{' or use fp32 (--dtype fp32)' if x.dtype in (torch.float16, torch.bfloat16) else ''}")


def _use_sdpa(unet: Any) -> None:
    """PyTorch's scaled-dot-product attention (flash / memory-efficient kernels on CUDA)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
