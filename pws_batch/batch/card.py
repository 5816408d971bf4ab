"""The dataset card (OUT/README.md) with huggingface_hub's DatasetCard, and its score histograms (OUT/card/*.png).

The card carries the Hub's metadata (license: the models' terms, task and size categories, the `configs` that
point `datasets` at the data parts), the counts, a sample table, score histograms, the generation settings and
how to load the data (the audio without torchcodec). It is built from the non-media columns only: no picture or
sound is read to write it.
"""

from __future__ import annotations

import heapq
import html
import io
import math
from typing import Any, Iterable

from pws_batch.batch.dataset import Output

CARD_TAGS = ["images-that-sound", "audio", "image", "spectrogram", "synthetic"]
TASK_CATEGORIES = ["text-to-image", "text-to-audio"]
# The licenses of the models whose outputs the dataset holds: the dataset inherits their terms.
MODEL_TERMS = {
    "stable-diffusion-v1-5/": ("creativeml-openrail-m", "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "runwayml/stable-diffusion-v1-5": ("creativeml-openrail-m", "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "auffusion/": ("cc-by-nc-sa-4.0", "https://huggingface.co/auffusion/auffusion-full-no-adapter"),
}
# The columns the card reads (never the media).
CARD_COLUMNS = ["pair_id", "image_prompt", "audio_prompt", "candidate_index", "seed", "rank", "clip_score",
                "clap_score", "crop_columns"]
# Settings of run.json's config the card leaves out (besides the ranking, shown as its rule): what to do with an
# earlier output, and where guides were read from and which cluster ran it (paths and addresses may be private)
NOT_SHOWN = {"plan.overwrite", "plan.allow_guides", "engine.ray_address"}
SCORES = {"clip_score": "CLIP score (picture vs image prompt)", "clap_score": "CLAP score (sound vs audio prompt)"}
SAMPLE_ROWS = 10


def model_terms(models: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """(component, model id, license, link) of every generating model whose terms are known."""
    terms = []
    for component in ("image", "audio"):
        model_id = models.get(component, "")
        for prefix, (license_, link) in MODEL_TERMS.items():
            if model_id.startswith(prefix):
                terms.append((component, model_id, license_, link))
                break
    return terms


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")):
        if n < limit:
            return name
    return "1B<n<10B"


def _finite(values: list) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def score(row: dict[str, Any]) -> float:
    """A kept row's worth across the dataset: CLIP + CLAP (a missing or NaN score counts 0)."""
    return sum(_finite([row.get("clip_score"), row.get("clap_score")]))


def best_order(row: dict[str, Any]) -> tuple:
    """The one order of "the best kept rows" (card, Prefect artifacts, gallery, --top): score, best first; ties by
    pair_id, then candidate_index."""
    return -score(row), str(row.get("pair_id")), row.get("candidate_index") or 0


def best(rows: Iterable[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The `k` best of `rows`, best first (best_order), without sorting them all."""
    return heapq.nsmallest(k, rows, key=best_order)


def describe_scores(values: list) -> str:
    """"mean M, min A, max B" of the scores that are numbers (the card's and `inspect`'s wording), or "n/a"."""
    values = _finite(values)
    if not values:
        return "n/a"
    return f"mean {sum(values) / len(values):.4f}, min {min(values):.4f}, max {max(values):.4f}"


def histogram_png(values: list, title: str) -> bytes:
    """A histogram of `values` as PNG bytes (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3), dpi=100)
    ax = fig.add_subplot()
    values = _finite(values)
    ax.hist(values, bins=min(30, max(5, len(values) // 2 or 1)), color="#4c72b0", edgecolor="white")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("score")
    ax.set_ylabel("kept rows")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _rule_text(ranking: dict[str, Any]) -> str:
    name = ranking.get("name", "reference")
    if name == "reference":
        return (f"reference: candidates in the top {ranking.get('top_fraction', 0.2):g} of the pair's candidates by "
                f"both CLIP and CLAP first")
    if name == "weighted":
        return (f"weighted: {ranking.get('clip_weight', 0.5):g} x CLIP + {ranking.get('clap_weight', 0.5):g} x CLAP, "
                f"each min-max normalised over the pair's candidates")
    return "pareto: the Pareto front of (CLIP, CLAP) first"


def _cell(value: Any, width: int | None = 60) -> str:
    """A value as the text of a markdown table cell: `|` and HTML's `<`, `>`, `&` escaped (prompts are the users'
    text; not every markdown viewer sanitises HTML), on one line, cut at `width` characters."""
    text = "" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
    text = text.replace("\n", " ")
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return html.escape(text, quote=False).replace("|", "\\|")


def settings(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """run.json's config as (`section.setting`, value) rows, in its order, without NOT_SHOWN and the ranking."""
    return [(f"{section}.{key}", value) for section, values in config.items() if section != "ranking"
            and isinstance(values, dict) for key, value in values.items() if f"{section}.{key}" not in NOT_SHOWN]


def canvas_widths(config: dict[str, Any], kept_rows: list[dict[str, Any]]) -> str:
    """The stored canvases' width: from the kept rows' crop_columns (a manifest row may set its own), else the
    run's default."""
    crops = {r["crop_columns"] for r in kept_rows if isinstance(r.get("crop_columns"), int)}
    if not crops:
        default = config.get("defaults", {}).get("crop_columns", 32)
        crops = {default} if isinstance(default, int) else set()
    widths = sorted(1024 - c for c in crops)
    if not widths:
        return "1024 - crop_columns"
    return str(widths[0]) if len(widths) == 1 else f"{widths[0]} to {widths[-1]} (per row: 1024 - crop_columns)"


LOAD_SNIPPET = '''```python
import io

import soundfile as sf
from datasets import Audio, load_dataset

# in this dataset's folder (from the Hub: load_dataset("USER/REPO", split="train"))
ds = load_dataset("parquet", data_files="data/part-*.parquet", split="train")
# datasets 5 decodes Audio with torchcodec (which needs FFmpeg); read the WAV/FLAC bytes with soundfile instead:
ds = ds.cast_column("audio", Audio(decode=False))
row = ds[0]
samples, rate = sf.read(io.BytesIO(row["audio"]["bytes"]))  # mono float64 samples, rate == 16000
picture = row["image"]  # a PIL image: the spectrogram that is also a picture
print(row["pair_id"], picture.size, rate, len(samples) / rate, "seconds")
```'''


def dataset_card(name: str, run: dict[str, Any], kept_rows: list[dict[str, Any]],
                 histograms: dict[str, str] | None = None) -> str:
    """The card's text. `kept_rows` hold the non-media columns; `histograms` maps a score to its PNG's path."""
    from huggingface_hub import DatasetCard, DatasetCardData

    counts = run.get("counts", {})
    models = run.get("models", {})
    config = run.get("config", {})
    terms = model_terms(models)
    licenses = sorted({t[2] for t in terms})
    data = DatasetCardData(
        pretty_name=name,
        license=licenses if len(licenses) > 1 else (licenses[0] if licenses else "other"),
        task_categories=TASK_CATEGORIES,
        size_categories=[size_category(len(kept_rows))],
        tags=CARD_TAGS,
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/part-*.parquet"}]}],
    )
    if not licenses:
        data.license_name = "model-terms"  # the Hub asks for a name when the license is "other"
    width = canvas_widths(config, kept_rows)
    audio_format = str(config.get("plan", {}).get("audio_format", "wav")).upper()
    sample = best(kept_rows, SAMPLE_ROWS)
    columns = ["pair_id", "image_prompt", "audio_prompt", "seed", "clip_score", "clap_score"]
    lines = [
        f"# {name}", "",
        f"Images that sound made with pws-batch: each row is one kept candidate, a 256 x {width} grayscale canvas "
        f"that is a picture (`image`, PNG) and a log-mel spectrogram (`audio`, 16 kHz mono {audio_format}, vocoded "
        f"from it). Two diffusion models denoised one shared latent (Chen, Geng & Owens, *Images that Sound*, "
        f"NeurIPS 2024); every pair's candidates were ranked by CLIP and CLAP and the best kept.", "",
        "## License", "",
        *(["The data are outputs of the models below and inherit their terms: "
           + "; ".join(f"the {c} model [`{m}`]({link}) is under `{lic}`" for c, m, lic, link in terms)
           + ". In particular `cc-by-nc-sa-4.0` allows no commercial use, and CreativeML OpenRAIL-M's use "
             "restrictions apply to the pictures."] if terms else
          ["The data are outputs of the models listed under *Models*; they inherit those models' terms."]), "",
        "## Counts", "",
        f"- prompt pairs in the manifest: {counts.get('rows', 'n/a')}",
        f"- pairs kept: {counts.get('pairs_done', 'n/a')}, failed: {counts.get('pairs_failed', 0)}, "
        f"rejected rows: {counts.get('rejected', 0)} (see `rejected.parquet`)",
        f"- candidates generated: {counts.get('candidates', 'n/a')}, rows kept: {counts.get('kept', 'n/a')}",
        "", "## Scores of the kept rows", "",
        f"- CLIP (picture vs image prompt): {describe_scores([r.get('clip_score') for r in kept_rows])}",
        f"- CLAP (sound vs audio prompt): {describe_scores([r.get('clap_score') for r in kept_rows])}",
        f"- ranking rule: {_rule_text(config.get('ranking', {}))}", "",
        *[f"![{SCORES[s]}]({path})" for s, path in (histograms or {}).items()], "",
        f"## Sample (the {len(sample)} best by CLIP + CLAP)", "",
        "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
        *["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in sample], "",
        "## Generation settings", "",
        "| setting | value |", "|---|---|",
        *[f"| {k} | {_cell(v, width=None)} |" for k, v in settings(config)],
        "", "A manifest row's own values (guidance, steps, seed, ...) win over these defaults; every row holds "
        "the parameters it was made with, its `base_seed` and its candidate's `seed`.", "",
        "## Models", "",
        *[f"- {k}: `{v}`" for k, v in models.items()],
        "", "## Load it", "",
        "With pandas: `pd.read_parquet(\"data\")`. With Hugging Face `datasets`:", "",
        LOAD_SNIPPET, "",
        "## Files", "",
        "- `data/part-*.parquet`: kept rows with media and all metadata (one schema for all parts)",
        "- `candidates/part-*.parquet`: every candidate's seed, scores, rank and kept flag",
        "- `rejected.parquet`: manifest rows that were not generated, with the reason",
        "- `run.json`: the run's configuration, library versions, model ids and features",
        "",
    ]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)).content


def write_card(out: Output, name: str, run: dict[str, Any], kept_rows: list[dict[str, Any]]) -> None:
    """OUT/README.md and the histograms it shows (OUT/card/clip_score.png, clap_score.png)."""
    histograms = {}
    if _finite([r.get("clip_score") for r in kept_rows]):
        for score, title in SCORES.items():
            out.write_bytes(f"card/{score}.png", histogram_png([r.get(score) for r in kept_rows], title))
            histograms[score] = f"card/{score}.png"
    out.write_bytes("README.md", dataset_card(name, run, kept_rows, histograms).encode())
