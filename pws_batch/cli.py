"""The `pws-batch` command line.

Arguments are checked before anything heavy is imported or any model is loaded: a bad argument costs a
fraction of a second and prints one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from pws_batch import __version__
from pws_batch.params import GenerationParams, ParamsError, check_guides, check_params

DEFAULTS = GenerationParams(image_prompt="", audio_prompt="")


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line instead of argparse's usage dump
        raise UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


# ------------------------------------------------------------------------------------------------ arguments
def _add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--image-prompt", required=True, help="what the picture shows (', grayscale' is appended)")
    g.add_argument("--audio-prompt", required=True, help="what the sound is")
    g.add_argument("--negative-image-prompt", default="", help="negative prompt of the image model (default: '')")
    g.add_argument("--negative-audio-prompt", default="", help="negative prompt of the audio model (default: '')")
    g.add_argument("--no-grayscale-suffix", action="store_true",
                   help="do not append ', grayscale' to the image prompt")
    s = p.add_argument_group("sampling (defaults: the reference implementation's)")
    s.add_argument("--candidates", type=int, default=1, help="candidates to make for the pair (default: 1)")
    s.add_argument("--seed", type=int, default=0, help="candidate i uses seed S + i (default: 0)")
    s.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"denoising steps (default: {DEFAULTS.steps})")
    s.add_argument("--guidance-image", type=float, default=DEFAULTS.guidance_image,
                   help=f"CFG scale of the image model (default: {DEFAULTS.guidance_image:g})")
    s.add_argument("--guidance-audio", type=float, default=DEFAULTS.guidance_audio,
                   help=f"CFG scale of the audio model (default: {DEFAULTS.guidance_audio:g})")
    s.add_argument("--t-image", type=float, default=DEFAULTS.t_image,
                   help=f"the image model joins once t <= T_IMAGE * T, in [0, 1] (default: {DEFAULTS.t_image:g})")
    s.add_argument("--t-audio", type=float, default=DEFAULTS.t_audio,
                   help=f"the audio model joins once t <= T_AUDIO * T, in [0, 1] (default: {DEFAULTS.t_audio:g})")
    s.add_argument("--weight-image", type=float, default=DEFAULTS.weight_image,
                   help=f"base weight a_image (default: {DEFAULTS.weight_image:g})")
    s.add_argument("--weight-audio", type=float, default=DEFAULTS.weight_audio,
                   help=f"base weight a_audio (default: {DEFAULTS.weight_audio:g})")
    s.add_argument("--scheduler", default=DEFAULTS.scheduler,
                   help="any diffusers scheduler class, built from SD's scheduler config (default: DDIMScheduler)")
    guide = s.add_mutually_exclusive_group()
    guide.add_argument("--guide-audio", metavar="FILE", help="start from this sound (wav/flac/..., any rate/length)")
    guide.add_argument("--guide-image", metavar="FILE", help="start from this picture (any size; made grayscale)")
    s.add_argument("--strength", type=float, default=None,
                   help="with a guide: fraction of the steps run, in (0, 1]; 1 = pure noise (default: 1)")
    s.add_argument("--crop-columns", type=int, default=DEFAULTS.crop_columns,
                   help=f"drop this many dark last columns of picture and sound (default: {DEFAULTS.crop_columns})")


def _add_runtime_args(p: argparse.ArgumentParser, models_default: str = "sd15-auffusion") -> None:
    r = p.add_argument_group("models and hardware")
    r.add_argument("--models", default=models_default,
                   help=f"model set: sd15-auffusion (real hub ids), tiny (random offline weights), or a path to a "
                        f"model_set.json / a folder holding one (default: {models_default})")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    r.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto = fp16 on CUDA, fp32 on CPU (default: auto)")
    r.add_argument("--micro-batch", type=int, default=8,
                   help="candidates denoised together in one batch; lower it if memory runs out (default: 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pws-batch", description="Batch generation of images that sound.")
    parser.add_argument("--version", action="version", version=f"pws-batch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="make N candidate images that sound for one prompt pair",
                         description="Make N candidates for one prompt pair: candidate-NNN.png (8-bit grayscale "
                                     "picture), candidate-NNN.wav (16 kHz mono), candidates.json (all parameters, "
                                     "seeds, model ids, U-Net evaluation counts, timings).")
    _add_generation_args(gen)
    _add_runtime_args(gen)
    gen.add_argument("--vocoder", default="hifigan", choices=["hifigan", "griffin-lim"],
                     help="Auffusion's HiFi-GAN, or weight-free Griffin-Lim (default: hifigan)")
    gen.add_argument("--out", required=True, help="output folder (local path or fsspec URI)")

    models = sub.add_parser("models", help="model sets: build the tiny one, show one")
    msub = models.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    tiny = msub.add_parser("build-tiny", help="build the tiny random model set offline (deterministic)")
    tiny.add_argument("--dir", help="where to write it (default: $PWS_BATCH_HOME/tiny-vN, ~/.cache/pws-batch)")
    show = msub.add_parser("show", help="print the components of a model set as JSON")
    show.add_argument("name", nargs="?", default="sd15-auffusion", help="a built-in name or a path")

    bench = sub.add_parser("bench", help="benchmarks that print ratios measured side by side")
    bsub = bench.add_subparsers(dest="bench_command", required=True, parser_class=_Parser)
    bs = bsub.add_parser("sampler", help="batched sampler vs the naive way, on the same work",
                         description="Runs, in one process, the batched sampler (all candidates together, inactive "
                                     "models skipped) and the naive way (one candidate at a time, every model at "
                                     "every step) on the same work; prints a table and the ratios.")
    bs.add_argument("--candidates", type=int, default=8, help="(default: 8)")
    bs.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    bs.add_argument("--t-image", type=float, default=DEFAULTS.t_image, help=f"(default: {DEFAULTS.t_image:g})")
    bs.add_argument("--t-audio", type=float, default=DEFAULTS.t_audio, help=f"(default: {DEFAULTS.t_audio:g})")
    _add_runtime_args(bs, models_default="tiny")
    return parser


# ------------------------------------------------------------------------------------------------ commands
def params_from_args(args: argparse.Namespace) -> GenerationParams:
    if args.strength is not None and not (args.guide_audio or args.guide_image):
        raise UsageError("pws-batch generate: error: --strength needs --guide-audio or --guide-image "
                         "(without a guide every run starts from pure noise)")
    params = GenerationParams(
        image_prompt=args.image_prompt, audio_prompt=args.audio_prompt,
        negative_image_prompt=args.negative_image_prompt, negative_audio_prompt=args.negative_audio_prompt,
        guidance_image=args.guidance_image, guidance_audio=args.guidance_audio, t_image=args.t_image,
        t_audio=args.t_audio, weight_image=args.weight_image, weight_audio=args.weight_audio, steps=args.steps,
        strength=1.0 if args.strength is None else args.strength, guide_audio=args.guide_audio,
        guide_image=args.guide_image, num_candidates=args.candidates, seed=args.seed, scheduler=args.scheduler,
        grayscale_suffix=not args.no_grayscale_suffix, crop_columns=args.crop_columns)
    problems = check_params(params) + check_guides(params)
    if problems:
        raise UsageError("pws-batch generate: error: " + "; ".join(_flag_problem(p) for p in problems))
    return params


_FLAGS = {"num_candidates": "--candidates"}


def _flag_problem(problem) -> str:
    """A params problem in the CLI's words: the field as its --flag."""
    flag = _FLAGS.get(problem.field, "--" + problem.field.replace("_", "-"))
    return f"{flag} {problem.message}" + (f" ({problem.fix})" if problem.fix else "")


def _check_runtime(args: argparse.Namespace) -> None:
    from pws_batch.models import ModelSetError, check_model_set_spec

    try:
        check_model_set_spec(args.models)
    except ModelSetError as exc:
        raise UsageError(f"pws-batch: error: --models: {exc}") from exc
    if args.micro_batch < 1:
        raise UsageError("pws-batch: error: --micro-batch must be >= 1")


def _prepare(args: argparse.Namespace, params: GenerationParams):
    """Resolve the model set and check the schedule against its scheduler config: still no weights loaded."""
    from pws_batch.models import load_scheduler_config, resolve_model_set
    from pws_batch.pipeline import check_request, resolve_device
    from pws_batch.sampler import ScheduleError

    try:
        resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(f"pws-batch: error: {exc}") from exc
    model_set = resolve_model_set(args.models)
    try:
        check_request(params, load_scheduler_config(model_set.image))
    except (ScheduleError, ParamsError, ValueError) as exc:
        raise UsageError(f"pws-batch: error: {exc}") from exc
    return model_set


def cmd_generate(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    _check_runtime(args)
    model_set = _prepare(args, params)

    from pws_batch.export import write_generation
    from pws_batch.pipeline import ImagesThatSoundPipeline

    t0 = time.perf_counter()
    pipe = ImagesThatSoundPipeline.from_model_set(model_set, device=args.device, dtype=args.dtype,
                                                  vocoder=args.vocoder)
    load_s = time.perf_counter() - t0
    with _progress(params, args.micro_batch, "generate") as on_step:
        result = pipe(params, micro_batch=args.micro_batch, on_step=on_step)
    result.timings["load_s"] = round(load_s, 4)
    path = write_generation(args.out, result, pipe, vocoder=args.vocoder, micro_batch=args.micro_batch)
    print(f"wrote {len(result.candidates)} candidates to {path} "
          f"({result.timings['total_s']:.1f} s, {sum(result.unet_evals.values())} U-Net evaluations)")
    return 0


class _progress:
    """A tqdm bar over denoising steps on a terminal; nothing when stderr is not a terminal."""

    def __init__(self, params: GenerationParams, micro_batch: int, desc: str):
        self.total = int(params.steps * (params.strength if params.guide_audio or params.guide_image else 1.0))
        self.total *= -(-params.num_candidates // micro_batch)
        self.desc = desc

    def __enter__(self):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc=self.desc, unit="step", disable=None, file=sys.stderr)
        return lambda _i: self.bar.update(1)

    def __exit__(self, *exc):
        self.bar.close()


def cmd_models(args: argparse.Namespace) -> int:
    from pws_batch.models import ModelSetError, resolve_model_set, tiny_dir

    if args.models_command == "build-tiny":
        folder = args.dir or tiny_dir()
        from pws_batch.tiny import build_tiny

        build_tiny(folder)
        print(f"built the tiny model set in {folder} (use --models {os.path.join(folder, 'model_set.json')} "
              f"or --models tiny for the default location)")
        return 0
    try:
        model_set = resolve_model_set(args.name)
    except ModelSetError as exc:
        raise UsageError(f"pws-batch models show: error: {exc}") from exc
    print(json.dumps(model_set.to_dict(), indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    _check_runtime(args)
    if args.candidates < 1 or args.steps < 1:
        raise UsageError("pws-batch bench sampler: error: --candidates and --steps must be >= 1")
    from pws_batch.bench import bench_sampler

    bench_sampler(models=args.models, candidates=args.candidates, steps=args.steps, t_image=args.t_image,
                  t_audio=args.t_audio, micro_batch=args.micro_batch, device=args.device, dtype=args.dtype)
    return 0


COMMANDS = {"generate": cmd_generate, "models": cmd_models, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pws-batch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - known failures print one line; set PWS_BATCH_DEBUG=1 for a trace
        from pws_batch.models import ModelLoadError, ModelSetError

        if isinstance(exc, (ModelLoadError, ModelSetError)) and not os.environ.get("PWS_BATCH_DEBUG"):
            print(f"pws-batch: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
