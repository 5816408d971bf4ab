"""The `pws-batch` command line.

Arguments are checked before anything heavy is imported or any model is loaded: a bad argument costs a
fraction of a second and prints one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from typing import Iterator, Sequence

from pws_batch import __version__
from pws_batch.batch.config import RunConfig, RunError, add_flags, from_args
from pws_batch.core.params import (DEVICES, DTYPES, VOCODERS, GenerationParams, ParamsError, check_guides,
                                   check_params)

DEFAULTS = GenerationParams(image_prompt="", audio_prompt="")


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line instead of argparse's usage dump
        raise UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


# The long --help text of each command (argparse re-wraps it).
DESCRIPTIONS = {
    "generate": """
        Make N candidates for one prompt pair: candidate-NNN.png (8-bit grayscale picture), candidate-NNN.wav
        (16 kHz mono), candidates.json (all parameters, seeds, model ids, U-Net evaluation counts, timings). Each
        micro-batch's files are written as soon as it is made (Ctrl-C keeps them), candidates.json once all are.
        --out is checked before any model is loaded: it must be writable and new or empty, or hold only an earlier
        generate's output, which --overwrite replaces (other files are never deleted: such a folder is refused).""",
    "models fetch": """
        Download only the files each component reads (safetensors where a repository publishes them, else its
        .bin files; no .ckpt, no non-EMA or fp16 variants, no safety checker) with
        huggingface_hub.snapshot_download: resumable (run it again after an interruption), with progress bars.
        Without --dir the files go to the Hugging Face cache (HF_HOME), where `--models sd15-auffusion` finds
        them offline; with --dir (made if missing), one folder per repository and a model_set.json to pass to
        --models, recording each folder's hub id. Components that are local folders are skipped. Then run
        `pws-batch models check`.""",
    "models check": """
        Offline and without loading any weights: one line per missing, damaged or inconsistent file (component,
        id, file, problem, fix); reads each weights file's header only (safetensors: header and size; torch
        .bin/.pt: its zip directory), and checks that both diffusion models share SD 1.5's latent space (4
        channels, VAE factor 8), that each U-Net takes its text encoder's width, and that the vocoder reads
        Auffusion's mels (256 mels, hop 160). Exit status 1 if anything is wrong. Hub ids are looked up in the
        Hugging Face cache (HF_HOME).""",
    "run": """
        Generate a curated dataset from a manifest of prompt pairs: the Prefect flow generate-dataset validates
        the manifest (bad rows go to rejected.parquet), runs one task per shard on Ray actors, ranks every
        candidate by CLIP and CLAP and keeps the best. Re-running into the same --out resumes: only shards not
        yet committed are generated. Uses the Prefect API at PREFECT_API_URL, or Prefect's ephemeral one; Ray at
        --ray-address / RAY_ADDRESS, or a local Ray.""",
    "submit": """
        Check the manifest (as `validate`; a manifest with no good row is refused), create a flow run of the
        generate-dataset deployment through the Prefect API at PREFECT_API_URL, print its id and its URL in the
        Prefect UI, and return. The manifest and --out must be reachable from the cluster's workers (shared
        paths or URIs such as s3://); what this machine can see of --out is checked first (as `run` does).
        Exit status with --wait: 0 completed, 1 did not, 3 stopped following a run that may still be running.""",
    "status": """
        The state of a flow run made by `pws-batch submit` (Prefect's state and its name, e.g. SCHEDULED (Late)),
        its shard tasks by state, the progress in pairs, the manifest, and the dataset's location and counts when
        its run.json is readable from here; exit status 1 if it failed, crashed or was cancelled.""",
    "validate": """
        Report every bad row of a manifest (row number, field, what is wrong, how to fix it); exit status 1 if
        any row is bad or there is no row.""",
    "gallery": """
        Write a static HTML page (no server, no CDN) with each kept pair's picture, an audio player, prompts,
        scores, seed and parameters, sortable by score and paginated; the media are files next to the page, so
        it works opened from disk.""",
    "export": """
        Write every kept row as NNNNN.png (the picture), NNNNN.wav or .flac (the sound, as stored) and
        NNNNN.json (every other column), img2dataset-style.""",
    "push": """
        Create the dataset repository REPO_ID if needed and upload the card, the data and candidates parts,
        rejected.parquet and run.json with huggingface_hub's upload_large_folder (resumable). Log in first with
        `hf auth login` or set HF_TOKEN.""",
    "bench sampler": """
        Runs, in one process, the batched sampler (all candidates together, inactive models skipped) and the
        naive way (one candidate at a time, every model at every step) on the same work; prints a table and the
        ratios.""",
    "bench cluster": """
        Runs the real flow, engine, writer and Prefect tasks on a local Ray that advertises --actors GPUs
        (logical resources), with stand-in actors that take --pair-seconds per pair and return small real media;
        prints the driver's CPU and memory and `orchestration efficiency E.EE` = pairs x pair-seconds / (actors
        x steady-state wall). Uses $PREFECT_API_URL, else an ephemeral Prefect API.""",
    "bench pipeline": """
        Runs the bare library (load the models, then generate and score each pair in one process) and the whole
        pipeline (the flow: Prefect API, Ray, actors, writer, finalize) on the same pairs, one after the other,
        --rounds times in turn; prints each round's table and steady state (from the first pair's end to the
        last's, on both sides), the medians over the rounds, and `pipeline efficiency E.EE of bare, start-up U.U s,
        finalize F.F s` (medians). On a CPU the bare library runs with the glibc malloc settings the CPU actors get
        (--compare-malloc: also without them); --ray-baseline also runs it beside an idle local Ray and in a Ray
        worker process, and splits the difference into Ray's processes sharing the machine, the work running in
        one of them, and the pipeline's own orchestration. Uses $PREFECT_API_URL, else an ephemeral Prefect API.""",
    "bench validate": """
        Builds a manifest of --rows rows (about 5% carry a bad value of some kind), validates it, and prints
        the seconds, this process's peak memory and whether torch was imported; with --compare N, also validates
        its first N rows one row at a time and says whether the answers agree.""",
}


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
    for name, what in (("guidance", "CFG scale of the {} model"),  # each model's own guidance, schedule, weight
                       ("t", "the {} model joins once t <= T_{} * T, in [0, 1]"), ("weight", "base weight a_{}")):
        for model in ("image", "audio"):
            default = getattr(DEFAULTS, f"{name}_{model}")
            s.add_argument(f"--{name}-{model}", type=float, default=default,
                           help=f"{what.format(model, model.upper())} (default: {default:g})")
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
    r.add_argument("--device", default="auto", choices=DEVICES, help="(default: auto)")
    r.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto = fp16 on CUDA, fp32 on CPU (default: auto)")
    r.add_argument("--micro-batch", type=int, default=8,
                   help="candidates denoised together in one batch; lower it if memory runs out (default: 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pws-batch", description="Batch generation of images that sound.")
    parser.add_argument("--version", action="version", version=f"pws-batch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="make N candidate images that sound for one prompt pair",
                         description=DESCRIPTIONS["generate"])
    _add_generation_args(gen)
    _add_runtime_args(gen)
    gen.add_argument("--vocoder", default="hifigan", choices=VOCODERS,
                     help="Auffusion's HiFi-GAN, or weight-free Griffin-Lim (default: hifigan)")
    gen.add_argument("--out", required=True,
                     help="output folder (local path or fsspec URI): new or empty, or holding an earlier generate's "
                          "output with --overwrite")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace an earlier generate's output in --out (its candidates.json and candidate-NNN.png/"
                          ".wav files); a folder holding any other file is refused either way")

    models = sub.add_parser("models", help="model sets: fetch one, check one, show one, build the tiny one")
    msub = models.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    tiny = msub.add_parser("build-tiny", help="build the tiny random model set offline (deterministic)")
    tiny.add_argument("--dir", help="where to write it (default: $PWS_BATCH_HOME/tiny-vN, ~/.cache/pws-batch)")
    show = msub.add_parser("show", help="print the components of a model set as JSON")
    show.add_argument("name", nargs="?", default="sd15-auffusion", help="a built-in name or a path")
    fetch = msub.add_parser("fetch", help="download a model set's files from the Hugging Face hub",
                            description=DESCRIPTIONS["models fetch"])
    fetch.add_argument("name", nargs="?", default="sd15-auffusion", help="a built-in name or a path (default: sd15-auffusion)")
    fetch.add_argument("--dir", help="download into this folder instead of the Hugging Face cache")
    check = msub.add_parser("check", help="check a model set's files offline, without loading weights",
                            description=DESCRIPTIONS["models check"])
    check.add_argument("name", nargs="?", default="sd15-auffusion", help="a built-in name or a path (default: sd15-auffusion)")

    runp = sub.add_parser("run", help="manifest -> Prefect flow -> Ray actors -> curated dataset",
                          description=DESCRIPTIONS["run"])
    runp.add_argument("manifest", help="Parquet, CSV or JSON Lines manifest (path or fsspec URI)")
    runp.add_argument("--out", required=True, help="dataset location: a path or fsspec URI (s3://, gs://, ...)")
    _add_run_args(runp)

    sb = sub.add_parser("submit", help="submit a manifest to a Prefect deployment (a cluster) and return at once",
                        description=DESCRIPTIONS["submit"])
    sb.add_argument("manifest", help="Parquet, CSV or JSON Lines manifest (path or fsspec URI)")
    sb.add_argument("--out", required=True, help="dataset location, as the workers see it (e.g. s3://bucket/name)")
    sb.add_argument("--deployment", default="generate-dataset/local",
                    help="FLOW/DEPLOYMENT (default: generate-dataset/local; generate-dataset/k8s on Kubernetes)")
    sb.add_argument("--wait", action="store_true",
                    help="follow the flow run to its end: exit 0 if it completed, 1 if it did not, 3 if it stopped "
                         "following a run that may still be running (the API gone for 2 minutes, or --wait-timeout)")
    sb.add_argument("--wait-timeout", type=float, default=None, metavar="SECONDS",
                    help="with --wait: stop following after this long (exit 3; the run goes on)")
    sb.add_argument("--no-model-check", action="store_true",
                    help="do not check the model set's files here (when they exist only on the workers, which check "
                         "them before starting Ray)")
    _add_run_args(sb)

    st = sub.add_parser("status", help="state, shard progress and dataset location of a submitted flow run",
                        description=DESCRIPTIONS["status"])
    st.add_argument("run_id", help="the flow run id printed by `pws-batch submit`")

    val = sub.add_parser("validate", help="check a manifest: every bad row with its field, problem and fix",
                         description=DESCRIPTIONS["validate"])
    val.add_argument("manifest", help="Parquet, CSV or JSON Lines manifest (path or fsspec URI)")
    add_flags(val, sections=("defaults",))
    add_flags(val, sections=("engine",), only=("models",))
    add_flags(val, sections=("plan",), only=("allow_guides",))

    insp = sub.add_parser("inspect", help="summarise a dataset written by `pws-batch run`",
                          description="Summarise a dataset written by `pws-batch run`: its status (complete, "
                                      "running, interrupted, failed, or DAMAGED when committed shards do not match "
                                      "their markers), counts, score ranges, rejected rows and failed pairs. Reads "
                                      "no media. Exit status 1 for a damaged or unreadable dataset.")
    insp.add_argument("out", help="the dataset's location (path or fsspec URI)")

    gal = sub.add_parser("gallery", help="a static HTML page to look at and listen to a dataset's kept pairs",
                         description=DESCRIPTIONS["gallery"])
    gal.add_argument("out", help="the dataset's location (path or fsspec URI)")
    gal.add_argument("--top", type=int, default=None, help="only the N best rows by CLIP + CLAP (default: all)")
    gal.add_argument("--out", dest="dest", default=None, help="where to write it (default: OUT/gallery)")

    exp = sub.add_parser("export", help="write a dataset as a folder of files (NNNNN.png, .wav/.flac, .json)",
                         description=DESCRIPTIONS["export"])
    exp.add_argument("out", help="the dataset's location (path or fsspec URI)")
    exp.add_argument("dir", help="the folder to write (path or fsspec URI)")
    exp.add_argument("--format", default="files", choices=["files"], help="(default: files)")
    exp.add_argument("--overwrite", action="store_true",
                     help="delete an earlier export's NNNNN.* files in DIR first (default: refuse such a DIR; "
                          "other files in it are always left alone)")

    push = sub.add_parser("push", help="upload a dataset to the Hugging Face Hub (needs the network and a token)",
                          description=DESCRIPTIONS["push"])
    push.add_argument("out", help="the dataset's local folder")
    push.add_argument("repo_id", help="USER/NAME of the dataset repository on the Hub")
    push.add_argument("--private", action="store_true", help="create the repository private")

    bench = sub.add_parser("bench", help="benchmarks that print ratios measured side by side")
    bsub = bench.add_subparsers(dest="bench_command", required=True, parser_class=_Parser)
    bs = bsub.add_parser("sampler", help="batched sampler vs the naive way, on the same work",
                         description=DESCRIPTIONS["bench sampler"])
    bs.add_argument("--candidates", type=int, default=8, help="(default: 8)")
    bs.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    bs.add_argument("--t-image", type=float, default=DEFAULTS.t_image, help=f"(default: {DEFAULTS.t_image:g})")
    bs.add_argument("--t-audio", type=float, default=DEFAULTS.t_audio, help=f"(default: {DEFAULTS.t_audio:g})")
    bs.add_argument("--architecture", choices=["sd15"], default=None,
                    help="instead of --models: random-weight U-Nets and VAEs in the real SD 1.5 / Auffusion "
                         "architecture (nothing downloaded), to time the real cost on a GPU")
    _add_runtime_args(bs, models_default="tiny")
    bc = bsub.add_parser("cluster", help="the real flow, engine and writer on a simulated GPU cluster",
                         description=DESCRIPTIONS["bench cluster"])
    bc.add_argument("--actors", type=int, default=4, help="worker actors = logical GPUs (default: 4)")
    bc.add_argument("--pairs", type=int, default=64, help="(default: 64)")
    bc.add_argument("--pair-seconds", type=float, default=0.5, help="seconds per pair a stand-in generator takes "
                                                                    "(default: 0.5; 0: the driver's own feed rate)")
    bc.add_argument("--candidates", type=int, default=8, help="candidates per pair (default: 8)")
    bc.add_argument("--micro-batch", type=int, default=8, help="(default: 8)")
    bc.add_argument("--shard-size", type=int, default=None, help="pairs per shard (default: auto)")
    bp = bsub.add_parser("pipeline", help="the bare library vs the whole pipeline on the same work",
                         description=DESCRIPTIONS["bench pipeline"])
    bp.add_argument("--pairs", type=int, default=4, help="(default: 4)")
    bp.add_argument("--candidates", type=int, default=8, help="(default: 8)")
    bp.add_argument("--steps", type=int, default=20, help="(default: 20)")
    bp.add_argument("--models", default="tiny", help="model set (default: tiny)")
    bp.add_argument("--micro-batch", type=int, default=8, help="(default: 8)")
    bp.add_argument("--compare-malloc", action="store_true",
                    help="also run the bare library with glibc's default malloc settings and print what the CPU "
                         "actors' settings are worth (default: the bare library runs with the actors' settings)")
    bp.add_argument("--ray-baseline", action="store_true",
                    help="also run the bare library beside an idle local Ray, and as one Ray task on a local Ray "
                         "started for it (placed as the worker is), and split the pipeline's cost into Ray's "
                         "processes, the work running in one of them, and its own orchestration")
    bp.add_argument("--rounds", type=int, default=3,
                    help="run the bare library and the pipeline in turn this many times and report the medians "
                         "(default: 3; one round's ratio can be off by a tenth on a busy or virtual machine)")
    bv = bsub.add_parser("validate", help="validate a generated manifest with every kind of bad value",
                         description=DESCRIPTIONS["bench validate"])
    bv.add_argument("--rows", type=int, default=100_000, help="(default: 100000)")
    bv.add_argument("--compare", type=int, default=0, help="rows to check against the row-by-row path (default: 0)")
    bv.add_argument("--other-scheduler", metavar="CLASS",
                    help="a third of the good rows use this diffusers scheduler class (say "
                         "DPMSolverMultistepScheduler), whose timesteps only diffusers computes (in a child "
                         "process: shows its cost) (default: none; the rows use DDIMScheduler and "
                         "EulerDiscreteScheduler and some bad rows name 'NoSuchScheduler', all checked without "
                         "diffusers)")
    return parser


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Every run option: one flag per field of the run config (pws_batch.batch.config)."""
    add_flags(p)


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
    from pws_batch.core.models import ModelSetError, check_model_set_spec

    try:
        check_model_set_spec(args.models)
    except ModelSetError as exc:
        raise UsageError(f"pws-batch: error: --models: {exc}") from exc
    if args.micro_batch < 1:
        raise UsageError("pws-batch: error: --micro-batch must be >= 1")


def _prepare(args: argparse.Namespace, params: GenerationParams):
    """Resolve the model set and check the schedule against its scheduler config: still no weights loaded."""
    from pws_batch.core.models import load_scheduler_config
    from pws_batch.core.device import resolve_device
    from pws_batch.core.pipeline import check_request
    from pws_batch.core.schedule import ScheduleError

    try:
        resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(f"pws-batch: error: {exc}") from exc
    model_set = _require_models("generate", args.models, vocoder=args.vocoder, scorers=False)
    try:
        check_request(params, load_scheduler_config(model_set.image))
    except (ScheduleError, ParamsError, ValueError) as exc:
        raise UsageError(f"pws-batch: error: {exc}") from exc
    return model_set


def _require_models(command: str, spec: str, vocoder: str = "hifigan", scorers: bool = True):
    """Fail fast, before Prefect, Ray or any model: the model set is known and the files the command will load
    are all there. Returns the model set."""
    from pws_batch.core.model_files import require_model_files
    from pws_batch.core.models import ModelSetError

    try:
        return require_model_files(spec, vocoder, scorers)
    except ModelSetError as exc:
        raise UsageError(f"pws-batch {command}: error: {exc}") from exc


def cmd_generate(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    _check_runtime(args)
    # Before any model is loaded: a --out that cannot be written (or would vanish) costs a second, not the run.
    check_writable(args.out, "generate", "the candidates")
    check_generate_out(args.out, args.overwrite)
    model_set = _prepare(args, params)

    from pws_batch.core.candidate_files import CandidateFolder
    from pws_batch.core.pipeline import ImagesThatSoundPipeline

    t0 = time.perf_counter()
    pipe = ImagesThatSoundPipeline.from_model_set(model_set, device=args.device, dtype=args.dtype,
                                                  vocoder=args.vocoder)
    load_s = time.perf_counter() - t0
    if pipe.device.type == "cpu":  # keep freed memory for the next step: ~1.4x faster (pws_batch.core.allocator)
        from pws_batch.core.allocator import keep_freed_memory

        keep_freed_memory()
    # Each micro-batch's files are written as soon as it is made (Ctrl-C keeps them), candidates.json at the end;
    # with --overwrite the earlier generate's files go just before the first new one is written.
    folder = CandidateFolder(args.out, replace_earlier=args.overwrite)
    try:
        with _progress(params, args.micro_batch, "generate") as on_step:
            result = pipe(params, micro_batch=args.micro_batch, on_step=on_step, on_candidates=folder.add)
    except KeyboardInterrupt:
        if folder.written:
            first, last = min(folder.written), max(folder.written)
            raise KeyboardInterrupt(f"{len(folder.written)} candidates written to {args.out} (candidate-{first:03d} "
                                    f"to candidate-{last:03d}: seeds {params.seed + first} to {params.seed + last}), "
                                    f"no candidates.json") from None
        raise
    result.timings["load_s"] = round(load_s, 4)
    path = folder.finish(result, pipe, vocoder=args.vocoder, micro_batch=args.micro_batch)
    print(f"wrote {len(result.candidates)} candidates to {path} "
          f"({result.timings['total_s']:.1f} s, {sum(result.unet_evals.values())} U-Net evaluations)")
    return 0


def _shown(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def check_generate_out(out: str, overwrite: bool) -> None:
    """Refuse, before any model is loaded, a --out whose files would mix with the new candidates: an earlier
    generate's output (unless --overwrite) or anything else (always: those files are not ours to delete)."""
    from pws_batch.core.candidate_files import existing_entries

    ours, others = existing_entries(out)
    if others:
        raise UsageError(f"pws-batch generate: error: --out {out} already holds files that pws-batch generate did "
                         f"not write ({_shown(others)}): the candidates would be written among them, and --overwrite "
                         f"replaces only candidates.json and candidate-NNN.png/.wav. Choose a new or empty folder "
                         f"for --out")
    if ours and not overwrite:
        raise UsageError(f"pws-batch generate: error: --out {out} already holds an earlier generate's output "
                         f"({len(ours)} files: {_shown(ours, 3)}): the new candidates would mix with them; pass "
                         f"--overwrite to replace them, or choose a new or empty folder for --out")


class _progress:
    """A tqdm bar over denoising steps on a terminal; nothing when stderr is not a terminal."""

    def __init__(self, params: GenerationParams, micro_batch: int, desc: str):
        self.total = int(params.steps * params.run_strength)
        self.total *= -(-params.num_candidates // micro_batch)
        self.desc = desc

    def __enter__(self):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc=self.desc, unit="step", disable=None, file=sys.stderr)
        return lambda _i: self.bar.update(1)

    def __exit__(self, *exc):
        self.bar.close()


def cmd_models(args: argparse.Namespace) -> int:
    from pws_batch.core.models import ModelSetError, resolve_model_set, tiny_dir

    if args.models_command == "build-tiny":
        folder = args.dir or tiny_dir()
        from pws_batch.core.tiny import build_tiny

        build_tiny(folder)
        print(f"built the tiny model set in {folder} (use --models {os.path.join(folder, 'model_set.json')} "
              f"or --models tiny for the default location)")
        return 0
    if args.models_command == "fetch" and args.name == "tiny":  # nothing to download: random weights made here
        raise UsageError("pws-batch models fetch: error: the tiny set is random weights built on this machine, not "
                         "downloaded: `pws-batch models build-tiny` (commands given --models tiny build it when "
                         "it is missing)")
    try:
        model_set = resolve_model_set(args.name)
    except ModelSetError as exc:
        raise UsageError(f"pws-batch models {args.models_command}: error: {exc}") from exc
    if args.models_command == "show":
        print(json.dumps(model_set.to_dict(), indent=2))
        return 0
    from pws_batch.core.model_files import FetchError, check_model_set, fetch_model_set

    spec = args.name
    if args.models_command == "fetch":
        try:
            written = fetch_model_set(model_set, spec, local_dir=args.dir)
        except FetchError as exc:
            raise UsageError(f"pws-batch models fetch: error: {exc}") from exc
        if written:
            model_set, spec = resolve_model_set(written), written
            print(f"wrote {written}: run with --models {written}")
    problems = check_model_set(model_set, spec)
    for problem in problems:
        print(problem)
    print(f"model set {spec}: " + (f"{len(problems)} problem{'s' if len(problems) != 1 else ''}" if problems else
                                   "complete (image, audio, vocoder, clip, clap: every file there, interfaces agree)"))
    return 1 if problems else 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "cluster":
        if min(args.actors, args.pairs, args.candidates, args.micro_batch) < 1 \
                or not 0 <= args.pair_seconds < float("inf") \
                or (args.shard_size is not None and args.shard_size < 1):
            raise UsageError("pws-batch bench cluster: error: --actors, --pairs, --candidates, --micro-batch and "
                             "--shard-size must be >= 1, --pair-seconds a number of seconds >= 0")
        from flows.generate_dataset import generate_dataset
        from pws_batch.batch.bench import bench_cluster

        bench_cluster(generate_dataset, actors=args.actors, pairs=args.pairs, pair_seconds=args.pair_seconds,
                      candidates=args.candidates, micro_batch=args.micro_batch, shard_size=args.shard_size)
        return 0
    if args.bench_command == "pipeline":
        if min(args.pairs, args.candidates, args.steps, args.micro_batch, args.rounds) < 1:
            raise UsageError("pws-batch bench pipeline: error: --pairs, --candidates, --steps, --micro-batch and "
                             "--rounds must be >= 1")
        from flows.generate_dataset import PROGRESS_LISTENERS, generate_dataset
        from pws_batch.batch.bench import bench_pipeline

        def run_flow(manifest: str, out: str, config) -> dict:  # as `pws-batch run` runs it
            t0 = time.perf_counter()
            with prefect_api_and_engine(config, out):
                api_s = time.perf_counter() - t0
                summary = generate_dataset(manifest, out, config)
            summary["timings"]["api_and_ray_s"] = round(api_s, 3)
            return summary

        bench_pipeline(run_flow, pairs=args.pairs, candidates=args.candidates, steps=args.steps,
                       models=args.models, micro_batch=args.micro_batch, compare_malloc=args.compare_malloc,
                       ray_baseline=args.ray_baseline, rounds=args.rounds, listeners=PROGRESS_LISTENERS)
        return 0
    if args.bench_command == "validate":
        if args.rows < 0 or args.compare < 0:
            raise UsageError("pws-batch bench validate: error: --rows and --compare must be >= 0")
        from pws_batch.batch.bench import bench_validate

        bench_validate(args.rows, compare=min(args.compare, args.rows), other_scheduler=args.other_scheduler)
        return 0
    _check_runtime(args)
    if args.candidates < 1 or args.steps < 1:
        raise UsageError("pws-batch bench sampler: error: --candidates and --steps must be >= 1")
    from pws_batch.core.bench import bench_sampler

    bench_sampler(models=args.models, candidates=args.candidates, steps=args.steps, t_image=args.t_image,
                  t_audio=args.t_audio, micro_batch=args.micro_batch, device=args.device, dtype=args.dtype,
                  architecture=args.architecture)
    return 0


def _run_config(args: argparse.Namespace, command: str) -> RunConfig:
    """The run config the flags describe, checked (model set name, ranges) before anything heavy is imported."""
    from pws_batch.core.models import ModelSetError, check_model_set_spec

    try:
        config = from_args(args)
        if command != "submit":  # `run` and `validate` read local guides; `submit` only what --allow-guides names
            config = config.replace(plan={"allow_guides": ("local", *config.plan.allow_guides)})
        check_model_set_spec(config.engine.models)
    except RunError as exc:
        raise UsageError(f"pws-batch {command}: error: {exc}") from exc
    except ModelSetError as exc:
        raise UsageError(f"pws-batch {command}: error: --models: {exc}") from exc
    return config


def pair_progress(bar):
    """The run's progress callback, (pairs_done, pairs_total) -> the bar: one tick per pair ranked. The first
    call gives the pairs already committed (resume); the clock starts at the first pair ranked after it, so the
    rate and the ETA are the steady ones, without the start-up (Prefect, Ray, model loads)."""
    import threading

    lock = threading.Lock()
    first_call, timing = True, False

    def on_progress(done: int, total: int) -> None:
        nonlocal first_call, timing
        with lock:
            bar.total = total
            if done <= bar.n or first_call:
                first_call = False
                bar.n = max(bar.n, done)
                bar.refresh()
            elif not timing:  # the first pair ranked: time from here
                timing = True
                bar.reset(total=total)
                bar.initial = bar.n = bar.last_print_n = done
                bar.refresh()
            else:
                bar.update(done - bar.n)

    return on_progress


def cmd_run(args: argparse.Namespace) -> int:
    from pws_batch.batch.run import answers_reused

    with answers_reused():  # the checks here and the flow's prepare ask the same questions of the manifest
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    _make_prefect_home()  # before Prefect is imported, which warns about a missing one
    config = _run_config(args, "run")
    from pws_batch.batch import engine
    from pws_batch.batch.lease import LeaseError, check_lease
    from pws_batch.batch.manifest import ManifestError
    from pws_batch.batch.run import check_models, check_output, no_good_rows, validate

    try:
        check_models(config)  # the flow's prepare asks again: answered from this check (answers_reused)
    except RunError as exc:
        raise UsageError(f"pws-batch run: error: {exc}") from exc
    try:
        # Before any flow run is created: a missing model, a refused resume, a held output or a manifest with
        # nothing to make costs seconds.
        check_writable(args.out)
        check_lease(args.out)
        validated, _ = validate(args.manifest, config)
        if not validated.requests:
            for r in validated.rejections:
                print(f"rejected {r}", file=sys.stderr)
            raise RunError(no_good_rows(args.manifest, validated) + "; nothing was written")
        check_output(args.manifest, args.out, config)
        # the address to join (--ray-address, else $RAY_ADDRESS), set up before ray is imported: it reads it then
        engine.check_ray_address(engine.ray_environment(config.engine.ray_address))
    except (ManifestError, RunError, LeaseError, engine.RayUnreachable) as exc:
        raise UsageError(f"pws-batch run: error: {exc}") from exc
    import logging

    # imported first so that its log handler exists and is redirected above the bar (its level: connect_ray's
    # ray.init sets it; its start-up notes are filtered in pws_batch/__init__.py)
    import ray  # noqa: F401
    with prefect_api_and_engine(config, args.out):
        # SIGTERM (a scheduler's stop, `kill`) ends the run as Ctrl-C does, with its own line and status; set after
        # Ray's start, whose driver handler exits with status 15 and no word
        signal.signal(signal.SIGTERM, _terminated)
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        from flows.generate_dataset import PROGRESS_LISTENERS, generate_dataset
        from pws_batch.batch.dataset import Output

        bar = tqdm(total=0, desc="pairs", unit="pair", disable=None, file=sys.stderr)
        on_progress = pair_progress(bar)

        PROGRESS_LISTENERS.append(on_progress)
        failure = None
        try:
            with logging_redirect_tqdm(loggers=[logging.getLogger(), logging.getLogger("ray")], tqdm_class=tqdm):
                generate_dataset(args.manifest, args.out, config)
        except RunError as exc:
            raise UsageError(f"pws-batch run: error: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - the flow failed; report what was written all the same
            failure = exc
        finally:
            PROGRESS_LISTENERS.remove(on_progress)
            bar.close()
    from pws_batch.batch.dataset import DatasetError, read_run_json

    if isinstance(failure, engine.PlacementError):  # e.g. --actors beyond the cluster: the flow's own words
        raise UsageError(f"pws-batch run: error: {failure}") from failure
    try:
        run_json = read_run_json(Output(args.out))
    except DatasetError as exc:
        raise UsageError(f"pws-batch run: error: {exc}" + (f" (the run failed: {_one_line(failure)})" if failure else "")) \
            from exc
    if run_json is None:
        raise UsageError(f"pws-batch run: error: the run wrote no run.json to {args.out}"
                         + (f": {_one_line(failure)}" if failure else ""))
    counts = run_json.get("counts", {})
    missing = counts.get("pairs_missing", 0)
    if failure is None:
        tail = ""
    elif missing:  # shards not committed: a re-run generates exactly those
        tail = f" ({missing} pairs not generated: {_one_line(failure)}; run again to resume)"
    else:
        tail = f" (the run failed: {_one_line(failure)})"
    print(f"dataset at {args.out}: {counts.get('pairs_done', 0)} pairs kept, {counts.get('pairs_failed', 0)} failed, "
          f"{counts.get('rejected', 0)} rejected" + tail)
    return 0 if failure is None and not counts.get("pairs_failed") else 1


# --- issue 11 (faults): one line, never a traceback
def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}" if text else type(exc).__name__


def check_writable(uri: str, command: str = "run", what: str = "the dataset") -> None:
    """Fail in one line, before any work, when OUT cannot be created or written (`run`, `generate`)."""
    from pws_batch.batch.dataset import Output

    if uri.startswith("memory://"):
        raise UsageError(f"pws-batch {command}: error: --out {uri} lives in this process's memory only: {what} would "
                         f"be gone when the command ends; use a path or a lasting URI (s3://, gs://, ...)")
    try:
        out = Output(uri)
        existed = out.fs.exists(out.root)
        out.write_bytes(".pws-batch-write-check", b"")
        out.fs.rm(out.path(".pws-batch-write-check"))
        if not existed:  # a refused run leaves nothing behind, not even the folder the probe made
            out.fs.rm(out.root, recursive=True)
    except Exception as exc:  # noqa: BLE001 - permission, read-only filesystem, bad credentials, no such bucket
        raise UsageError(f"pws-batch {command}: error: cannot write to --out {uri} ({_one_line(exc)}); choose a "
                         f"location you can write to") from exc


def _make_prefect_home(home: str | None = None) -> None:
    """Create PREFECT_HOME (`home`, else $PREFECT_HOME if set), or fail in one line naming it."""
    home = home or os.environ.get("PREFECT_HOME")
    if home:
        try:
            os.makedirs(os.path.expanduser(str(home)), exist_ok=True)
        except OSError as exc:
            raise UsageError(f"pws-batch run: error: cannot create PREFECT_HOME {home} ({_one_line(exc)}); "
                             f"set PREFECT_HOME to a folder you can write") from exc


EPHEMERAL_TIMEOUT_S = 120  # Prefect's default (20 s) is too short for a loaded 2-core machine
TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


@contextlib.contextmanager
def prefect_api_and_engine(config, out: str) -> Iterator[None]:
    """For the block (one command's flow run): Prefect's API, started (when no PREFECT_API_URL is set) in a thread
    while this thread starts Ray and the run's actors, which load their models meanwhile; the flow run takes them
    (engine.take_warm). Nothing is started on the engine's side when `out` holds a complete run (a resume with
    nothing to do). At the end, an ephemeral API is stopped and what no flow took too."""
    import concurrent.futures

    from pws_batch.batch import engine
    from pws_batch.batch.prefect_api import use_api
    from pws_batch.batch.run import may_have_work

    try:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefect-api") as pool:
            api = pool.submit(start_prefect_api)
            try:
                if may_have_work(out, config):
                    engine.warm_up(config, log=lambda line: None)
            except BaseException:  # e.g. Ctrl-C: stop the API too, once it has started
                if api.exception() is None and api.result() is not None:
                    api.result().stop()
                raise
        server = api.result()
        with use_api(server) if server is not None else contextlib.nullcontext():
            yield
    finally:
        engine.discard_warm()


def start_prefect_api():
    """Without PREFECT_API_URL the flow runs against an ephemeral API server (pws_batch.batch.prefect_api, returned;
    None when an API is configured): create PREFECT_HOME if it is missing (its database lives there), start the
    server with the time a loaded machine needs (a user's own setting wins), try once more if it does not answer,
    and fail in one line naming what to set."""
    # Prefect's ephemeral server sends no telemetry (offline it logged an ERROR on every run).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    _make_prefect_home(settings.home)
    if settings.api.url:
        return None
    configured = settings.server.ephemeral.startup_timeout_seconds
    timeout = configured if TIMEOUT_SETTING in os.environ or configured != 20 else EPHEMERAL_TIMEOUT_S
    from pws_batch.batch.prefect_api import EphemeralApi, EphemeralApiError

    for attempt in (1, 2):
        try:
            return EphemeralApi.start(timeout)
        except EphemeralApiError as exc:  # timed out (stopped) or the server died: once more
            failure = exc
    raise UsageError(f"pws-batch run: error: Prefect's ephemeral API server did not answer within {timeout} s "
                     f"(tried twice; {_one_line(failure)[:200]}); on a busy machine give it longer with "
                     f"{TIMEOUT_SETTING}=300, or start a server (`prefect server start`) and set PREFECT_API_URL")


def cmd_submit(args: argparse.Namespace) -> int:
    from pws_batch.batch.manifest import ManifestError, manifest_name
    from pws_batch.batch.run import answers_reused, validate
    from pws_batch.batch.submit import (LostTrack, SubmitError, check_api, check_deployment, format_status,
                                        submit, wait)

    if args.wait_timeout is not None and not args.wait_timeout > 0:
        raise UsageError(f"pws-batch submit: error: --wait-timeout must be a number of seconds > 0, got "
                         f"{args.wait_timeout:g}")
    args.manifest = _absolute(args.manifest)
    args.out = _absolute(args.out)
    config = _run_config(args, "submit")
    if not args.no_model_check:
        _require_models("submit", config.engine.models, vocoder=config.engine.vocoder)
    with answers_reused():  # the --out check asks the manifest's questions again: answered once
        try:
            check_api()  # an unreachable API or a missing deployment fails in seconds, before any validation work
            check_deployment(args.deployment)
            validated, _ = validate(args.manifest, config)
        except (ManifestError, SubmitError) as exc:
            raise UsageError(f"pws-batch submit: error: {exc}") from exc
        _check_out_from_here(args.manifest, args.out, config)
    for r in validated.rejections:
        print(f"rejected {r}", file=sys.stderr)
    if not validated.requests:
        raise UsageError(f"pws-batch submit: error: {args.manifest} has no good row ({validated.num_rows} rows, "
                         f"all rejected); nothing submitted. See `pws-batch validate {args.manifest}`")
    try:
        for name, other, state in _others_writing_to(args.deployment, args.out):
            print(f"warning: flow run {name} ({other}, {state}) also writes to {args.out}: whichever starts second "
                  f"is refused the output; cancel one (`prefect flow-run cancel {other}`) or use another --out",
                  file=sys.stderr)
        run_id, url = submit({"manifest": args.manifest, "out": args.out, "config": config.to_dict()},
                             args.deployment, name=f"{manifest_name(args.manifest)}-"
                                                   f"{time.strftime('%Y%m%d-%H%M%S')}")
    except SubmitError as exc:
        raise UsageError(f"pws-batch submit: error: {exc}") from exc
    rejected = len(validated.rejections)
    print(f"submitted {len(validated.requests)} pairs ({rejected} row{'s' if rejected != 1 else ''} rejected) to "
          f"{args.deployment}: flow run {run_id}")
    print(f"watch it at {url}")
    if not args.wait:
        return 0
    try:
        info = wait(run_id, say=lambda line: print(line, file=sys.stderr), timeout_s=args.wait_timeout)
    except LostTrack as exc:  # not the run's failure: it may still be running
        print(f"pws-batch submit: {exc}", file=sys.stderr)
        return 3
    print(format_status(info))
    return 0 if info["state"] == "COMPLETED" else 1


def _others_writing_to(deployment: str, out: str) -> list[tuple[str, str, str]]:
    """submit.runs_writing_to, for a warning only: [] when the API cannot say."""
    from pws_batch.batch.submit import runs_writing_to

    try:
        return runs_writing_to(deployment, out)
    except Exception:  # noqa: BLE001 - a warning is not worth failing the submission for
        return []


def _check_out_from_here(manifest: str, out: str, config) -> None:
    """`submit`'s checks of --out before a flow run is made, as far as this machine sees it (the flow runs on a
    worker, which checks again): never memory://; not a file; an existing output: not held by a live run, not made
    from another manifest or with other settings. An --out this machine cannot reach (no such filesystem or
    credentials here) is left to the flow."""
    from pws_batch.batch.dataset import DatasetError, Output
    from pws_batch.batch.lease import LeaseError, check_lease
    from pws_batch.batch.run import check_output

    if out.startswith("memory://"):
        raise UsageError(f"pws-batch submit: error: --out {out} would live in the memory of the flow's process only: "
                         f"the dataset would be gone when it ends; use a path the workers share or a lasting URI "
                         f"(s3://, gs://, ...)")
    try:
        output = Output(out)
        exists = output.fs.exists(output.root)
        is_file = exists and not output.fs.isdir(output.root)
    except Exception:  # noqa: BLE001 - not reachable from here: the flow checks it where it runs
        return
    if is_file:
        raise UsageError(f"pws-batch submit: error: --out {out} is a file; the dataset is a folder: choose a new or "
                         f"empty folder")
    if exists:
        try:
            check_lease(out)
            check_output(manifest, out, config)
        except (LeaseError, RunError) as exc:
            raise UsageError(f"pws-batch submit: error: {exc}") from exc
        except (OSError, DatasetError):  # listed but not readable from here (an object store's permissions)
            return


def _absolute(uri: str) -> str:
    """Local paths are made absolute: the workers do not share our working directory."""
    return uri if "://" in uri else os.path.abspath(uri)


def cmd_status(args: argparse.Namespace) -> int:
    from pws_batch.batch.submit import SubmitError, describe, format_status

    try:
        info = describe(args.run_id)
    except SubmitError as exc:
        raise UsageError(f"pws-batch status: error: {exc}") from exc
    print(format_status(info))
    return 0 if info["state"] not in ("FAILED", "CRASHED", "CANCELLED") else 1


def cmd_validate(args: argparse.Namespace) -> int:
    from pws_batch.batch.manifest import ManifestError
    from pws_batch.core.models import ModelSetError
    from pws_batch.batch.run import kept_features, no_good_rows, validate

    config = _run_config(args, "validate")
    try:
        validated, _ = validate(args.manifest, config)
    except (ManifestError, ModelSetError) as exc:
        raise UsageError(f"pws-batch validate: error: {exc}") from exc
    _, schema_warnings = kept_features(validated.requests)  # the pass-through columns `run` will write as text
    for w in [*validated.warnings, *schema_warnings]:
        print(f"warning: {w}")
    for r in validated.rejections:
        print(str(r))
    print(f"{args.manifest}: {validated.num_rows} rows, {len(validated.requests)} good, "
          f"{len(validated.rejections)} bad")
    if not validated.num_rows:  # `run` refuses it: so does the check people put before it
        print(no_good_rows(args.manifest, validated), file=sys.stderr)
    return 1 if validated.rejections or not validated.num_rows else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pws_batch.batch.dataset import DatasetError
    from pws_batch.batch.summary import summary

    try:
        text, damaged = summary(args.out)
    except FileNotFoundError as exc:
        raise UsageError(f"pws-batch inspect: error: {exc}") from exc
    except DatasetError as exc:
        print(f"pws-batch inspect: error: {exc}", file=sys.stderr)
        return 1
    print(text)
    return 1 if damaged else 0  # scripts that check a dataset see the damage too


@contextlib.contextmanager
def _usage_errors(command: str, *errors: type[BaseException]):
    """The `errors` a command expects (a missing dataset, a bad argument) as one usage line, exit status 2."""
    try:
        yield
    except errors as exc:
        raise UsageError(f"pws-batch {command}: error: {exc}") from exc


def cmd_gallery(args: argparse.Namespace) -> int:
    from pws_batch.batch.dataset import DatasetError
    from pws_batch.batch.gallery import write_gallery

    if args.top is not None and args.top < 1:
        raise UsageError(f"pws-batch gallery: error: --top must be >= 1, got {args.top}")
    with _usage_errors("gallery", FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError,
                       DatasetError):
        where = write_gallery(args.out, top=args.top, dest=args.dest)
        _note_if_unfinished(args.out, "the page shows")
    print(f"open {where}")
    return 0


def _note_if_unfinished(out: str, what: str) -> None:
    """A line on stderr when the dataset's run did not complete (interrupted, running, failed): `what` holds only
    its committed shards."""
    from pws_batch.batch.dataset import Output, read_run_json
    from pws_batch.batch.summary import run_status

    output = Output(out)
    run = read_run_json(output) or {}
    if run.get("status") and run["status"] != "complete":
        print(f"note: the run that wrote {out} is {run_status(output, run)}, not complete: {what} only its "
              f"committed shards (`pws-batch inspect {out}`)", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> int:
    from pws_batch.batch.dataset import DatasetError
    from pws_batch.batch.export import ExportError, export_files

    with _usage_errors("export", FileNotFoundError, ExportError, NotADirectoryError, FileExistsError,
                       PermissionError, DatasetError):
        n = export_files(args.out, args.dir, overwrite=args.overwrite)
        _note_if_unfinished(args.out, "the export holds")
    print(f"exported {n} rows of {args.out} to {args.dir} (NNNNN.png, NNNNN.wav/.flac, NNNNN.json)")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from pws_batch.batch.export import push

    with _usage_errors("push", FileNotFoundError, ValueError, ConnectionError):
        url = push(args.out, args.repo_id, private=args.private)
    print(f"pushed {args.out} to {url}")
    return 0


COMMANDS = {"generate": cmd_generate, "run": cmd_run, "submit": cmd_submit, "status": cmd_status,
            "validate": cmd_validate, "inspect": cmd_inspect, "models": cmd_models, "bench": cmd_bench,
            "gallery": cmd_gallery, "export": cmd_export, "push": cmd_push}


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled as Ctrl-C is (the flow records how it ended, what was committed is kept)."""


def _terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one is not held up by the clean-up
    raise Terminated()


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fileno, no poll
        return False


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # huggingface_hub noise, not ours
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except Terminated:
        print("pws-batch: terminated (SIGTERM); what was committed is kept: the same command resumes", file=sys.stderr)
        return 143
    except KeyboardInterrupt as exc:
        print("pws-batch: interrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    except BrokenPipeError as exc:
        if not _stdout_closed():  # another pipe (a socket, a child's): an error like any other
            print(f"pws-batch: error: {_one_line(exc)}", file=sys.stderr)
            return 1
        # `pws-batch inspect OUT | head -1`: the reader has what it wanted; say nothing
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # else Python's flush at exit reports the closed pipe again
        return 141  # as a process killed by SIGPIPE
    except Exception as exc:  # noqa: BLE001 - known failures print one line; set PWS_BATCH_DEBUG=1 for a trace
        from pws_batch.core.models import ModelLoadError, ModelSetError

        if os.environ.get("PWS_BATCH_DEBUG"):
            raise
        if isinstance(exc, (ModelLoadError, ModelSetError)):
            print(f"pws-batch: error: {exc}", file=sys.stderr)
            return 1
        # issue 11: anything else is still one line (the traceback with PWS_BATCH_DEBUG=1)
        print(f"pws-batch: error: {_one_line(exc)} (set PWS_BATCH_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
