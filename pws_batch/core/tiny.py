"""The `tiny` model set: random weights built offline, deterministically, in exactly the real layouts and
file formats.

- `image/`: a diffusers Stable Diffusion folder as `stable-diffusion-v1-5` publishes it: safetensors weights,
  and a model_index.json that names a `safety_checker` and a `feature_extractor` (tiny ones are written too;
  pws-batch never loads them);
- `audio/`: as `auffusion-full-no-adapter` publishes it: pickle-format `.bin` weights only
  (`unet/diffusion_pytorch_model.bin`, `vae/diffusion_pytorch_model.bin`, `text_encoder/pytorch_model.bin`),
  and `vocoder/` (config.json + vocoder.pt with HiFi-GAN's old-style weight-norm keys);
- `clip/` (model.safetensors) and `clap/` (pytorch_model.bin): transformers CLIPModel / ClapModel folders with
  their processors, so both of transformers' weight formats are loaded by the tests;
- `model_set.json`: the model set pointing at those folders.

They are then loaded through the same `from_pretrained` code as real weights. The configs keep the real
interfaces (reference_configs/*.json, checked by tests/test_model_files.py): 4 latent channels, VAE factor 8
and scaling factor 0.18215, cross-attention dim 768 (so the tiny text encoders are 768 wide, one layer deep),
77-token CLIP tokenizers, a 514-position CLAP text model, SD 1.5's scheduler config, a HiFi-GAN V1 with 256
mels and upsample rates multiplying to 160. Widths and depths are shrunk, and the U-Net attends only at its
lowest resolution, so a whole pipeline runs in seconds on 2 CPU cores at the real 4 x 32 x 128 latent and
256 x 1024 canvas.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

TINY_VERSION = 2  # bump when the tiny architectures or layouts change, so cached builds are rebuilt
TEXT_DIM = 32  # CLIP / CLAP widths (internal to the scorers)
CROSS_ATTENTION_DIM = 768  # SD 1.5's and Auffusion's: the diffusion text encoders' width


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


def write_tokenizer_files(tokenizer, folder: str) -> None:
    """A byte-level BPE tokenizer as the real repos publish it: vocab.json + merges.txt + tokenizer_config.json +
    special_tokens_map.json (transformers 5 would write a tokenizer.json instead)."""
    os.makedirs(folder, exist_ok=True)
    tokenizer.save_pretrained(folder)
    vocab = dict(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")  # no merges: every byte is its own token
    specials = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2, sort_keys=True)
    for name in ("tokenizer.json", "chat_template.jinja"):
        if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def write_preprocessor(processor_part, folder: str) -> None:
    """An image processor / feature extractor as preprocessor_config.json (the real repos' file), and no
    processor_config.json (transformers 5's)."""
    processor_part.save_pretrained(folder)
    combined = os.path.join(folder, "processor_config.json")
    if os.path.isfile(combined):
        os.remove(combined)


def _text_config(tokenizer, hidden_size: int = TEXT_DIM, layers: int = 2, heads: int = 4) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def build_sd_folder(folder: str, seed: int, bin_weights: bool = False, safety_checker: bool = False) -> None:
    """A tiny Stable Diffusion 1.5-layout pipeline folder with random weights from `seed`.

    `bin_weights`: pickle-format .bin files only, as Auffusion publishes; else safetensors, as SD 1.5 does.
    `safety_checker`: write SD 1.5's `safety_checker` and `feature_extractor` entries (tiny ones).
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM, attention_head_dim=2, norm_num_groups=2)
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
    text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(tokenizer, CROSS_ATTENTION_DIM, layers=1, heads=12)))
    # Stable Diffusion 1.5's own scheduler config (the sampler builds DDIM from it, as the reference does).
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False,
                              steps_offset=1)
    checker, extractor = (_tiny_safety_checker(seed + 3), _clip_image_processor()) if safety_checker else (None, None)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=checker, feature_extractor=extractor,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=not bin_weights)
    write_tokenizer_files(tokenizer, os.path.join(folder, "tokenizer"))
    # SD 1.5's scheduler_config.json as published: it also holds keys PNDM ignores but DDIM reads (clip_sample).
    from pws_batch.core.model_files import reference_config

    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(reference_config("sd15")["scheduler"], f, indent=2, sort_keys=True)
    if safety_checker:
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
        index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]  # as SD 1.5's model_index.json
        with open(os.path.join(folder, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    if bin_weights:
        # transformers 5 writes safetensors whatever it is asked; Auffusion's text encoder is a .bin.
        path = os.path.join(folder, "text_encoder", "model.safetensors")
        if os.path.isfile(path):
            _as_bin(path, os.path.join(folder, "text_encoder", "pytorch_model.bin"))


def _as_bin(safetensors_path: str, bin_path: str) -> None:
    """Rewrite a safetensors file as a torch .bin state dict (the format some real repos publish)."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(safetensors_path), bin_path)
    os.remove(safetensors_path)


def _clip_image_processor():
    from transformers import CLIPImageProcessor

    # The real ViT preprocessing: resize shortest side to 224, centre crop 224, CLIP's mean/std.
    return CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


def _tiny_safety_checker(seed: int):
    """SD 1.5's StableDiffusionSafetyChecker class, tiny; only so model_index.json names what the real one does."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(text_config=dict(hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=4),
                        vision_config=dict(hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=224, patch_size=32),
                        projection_dim=16)
    torch.manual_seed(seed)
    return StableDiffusionSafetyChecker(config)


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
    from transformers import CLIPConfig, CLIPModel

    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=_text_config(tokenizer),
        vision_config=dict(hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    write_preprocessor(_clip_image_processor(), folder)
    write_tokenizer_files(tokenizer, folder)


def build_clap_folder(folder: str, seed: int) -> None:
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    tokenizer = build_roberta_tokenizer()
    text = _text_config(tokenizer)
    text.update(max_position_embeddings=514, type_vocab_size=1)  # laion/clap-htsat-unfused's RoBERTa: 514
    config = ClapConfig(
        text_config=text,
        audio_config=dict(spec_size=256, num_mel_bins=64, window_size=8, patch_size=4, patch_stride=[4, 4],
                          depths=[1, 1], num_attention_heads=[2, 2], patch_embeds_hidden_size=8,
                          hidden_size=16, projection_hidden_size=16, enable_fusion=False),
        projection_dim=16)
    torch.manual_seed(seed)
    ClapModel(config).save_pretrained(folder)
    # As pytorch_model.bin (transformers 5 writes safetensors only): the other format transformers repos publish.
    _as_bin(os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin"))
    # laion/clap-htsat-unfused ships truncation="rand_trunc" (no fusion); callers crop to 10 s first.
    extractor = ClapFeatureExtractor(truncation="rand_trunc")
    write_preprocessor(extractor, folder)
    write_tokenizer_files(tokenizer, folder)


def build_tiny(folder: str) -> str:
    """Write the whole tiny model set to `folder` (atomically: built aside, then renamed into place)."""
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".tiny-build-", dir=parent)
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a "Writing model shards" bar per tiny model says nothing
    try:
        build_sd_folder(os.path.join(work, "image"), seed=1000, safety_checker=True)
        build_sd_folder(os.path.join(work, "audio"), seed=2000, bin_weights=True)
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
        if bars:
            transformers_logging.enable_progress_bar()
    return folder
