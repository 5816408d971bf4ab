"""The `tiny` model set: random weights built offline, deterministically, in exactly the real layouts.

- `image/`, `audio/`: diffusers Stable Diffusion folders (model_index.json, unet/, vae/, text_encoder/,
  tokenizer/, scheduler/), as `stable-diffusion-v1-5` and `auffusion-full-no-adapter` ship them;
- `audio/vocoder/`: Auffusion's vocoder folder (config.json + vocoder.pt with weight-norm keys);
- `clip/`, `clap/`: transformers CLIPModel / ClapModel folders with their processors;
- `model_set.json`: the model set pointing at those folders.

They are then loaded through the same `from_pretrained` code as real weights. Sizes are chosen so a whole
pipeline runs in seconds on 2 CPU cores at the real 4 x 32 x 128 latent and 256 x 1024 canvas.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

TINY_VERSION = 1  # bump when the tiny architectures change, so cached builds are rebuilt
TEXT_DIM = 32


def _byte_level_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def build_clip_tokenizer():
    """A CLIPTokenizer over single bytes (no merges): every text tokenizes, offline."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for ch in _byte_level_alphabet():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_roberta_tokenizer():
    """The text side of CLAP: a byte-level RobertaTokenizer with no merges."""
    from transformers import RobertaTokenizer

    vocab = {tok: i for i, tok in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    for ch in _byte_level_alphabet():
        vocab.setdefault(ch, len(vocab))
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=512)


def _text_config(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def build_sd_folder(folder: str, seed: int) -> None:
    """A tiny Stable Diffusion 1.5-layout pipeline folder with random weights from `seed`."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=2, norm_num_groups=2)
    # A trained U-Net predicts unit-variance noise and denoising contracts; a random one is a chaotic map, and
    # 100 DDIM steps amplify float rounding (which differs with batch size) into unrelated pictures. A smaller
    # output layer keeps the random map contractive, so batched and single candidates agree as with real weights.
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256)
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(tokenizer)))
    # Stable Diffusion 1.5's own scheduler config (the sampler builds DDIM from it, as the reference does).
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def build_vocoder_folder(folder: str, seed: int) -> None:
    """A tiny HiFi-GAN in Auffusion's vocoder layout: 256 mels in, upsample rates multiplying to 160."""
    import torch

    from pws_batch.core.vocoder import HifiGanGenerator, save_vocoder

    config = {
        "resblock": "1", "num_gpus": 0, "num_mels": 256, "sampling_rate": 16000,
        "upsample_rates": [5, 4, 2, 2, 2], "upsample_kernel_sizes": [11, 8, 4, 4, 4],
        "upsample_initial_channel": 64, "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]],
        "n_fft": 2048, "hop_size": 160, "win_size": 1024, "fmin": 0, "fmax": 8000,
    }
    torch.manual_seed(seed)
    save_vocoder(HifiGanGenerator(config), folder)


def build_clip_folder(folder: str, seed: int) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=_text_config(tokenizer),
        vision_config=dict(hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    # The real ViT-B/16 preprocessing: resize shortest side to 224, centre crop 224, CLIP's mean/std.
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 224},
                                                                 crop_size={"height": 224, "width": 224}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)


def build_clap_folder(folder: str, seed: int) -> None:
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    tokenizer = build_roberta_tokenizer()
    text = _text_config(tokenizer)
    text.update(max_position_embeddings=80, type_vocab_size=1)
    config = ClapConfig(
        text_config=text,
        audio_config=dict(spec_size=256, num_mel_bins=64, window_size=8, patch_size=4, patch_stride=[4, 4],
                          depths=[1, 1], num_attention_heads=[2, 2], patch_embeds_hidden_size=8,
                          hidden_size=16, projection_hidden_size=16, enable_fusion=False),
        projection_dim=16)
    torch.manual_seed(seed)
    ClapModel(config).save_pretrained(folder, safe_serialization=True)
    # laion/clap-htsat-unfused ships truncation="rand_trunc" (no fusion); callers crop to 10 s first.
    extractor = ClapFeatureExtractor(truncation="rand_trunc")
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)


def build_tiny(folder: str) -> str:
    """Write the whole tiny model set to `folder` (atomically: built aside, then renamed into place)."""
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".tiny-build-", dir=parent)
    try:
        build_sd_folder(os.path.join(work, "image"), seed=1000)
        build_sd_folder(os.path.join(work, "audio"), seed=2000)
        build_vocoder_folder(os.path.join(work, "audio", "vocoder"), seed=3000)
        build_clip_folder(os.path.join(work, "clip"), seed=4000)
        build_clap_folder(os.path.join(work, "clap"), seed=5000)
        with open(os.path.join(work, "model_set.json"), "w") as f:
            json.dump({"name": "tiny", "image": "image", "audio": "audio", "vocoder": "audio",
                       "clip": "clip", "clap": "clap", "tiny_version": TINY_VERSION}, f, indent=2)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        try:
            os.rename(work, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, "model_set.json")):  # not another builder that won
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder
