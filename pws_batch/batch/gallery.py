"""`pws-batch gallery OUT`: a static HTML page to look at and listen to a dataset's kept pairs.

OUT/gallery/index.html (or --out DIR, any fsspec URI) with each row's picture, an `<audio>` player, prompts,
scores, seed and parameters; sortable by score and paginated by a small inline script (no CDN, no server).
The media are files next to the page (media/NNNNN.png, media/NNNNN.wav|flac), so it works opened from disk.
Only the chosen rows' media are read.
"""

from __future__ import annotations

import base64
import html
import json
import math
from typing import Any

import pyarrow.parquet as pq

from pws_batch.batch.card import best, best_order
from pws_batch.batch.dataset import DatasetError, Output, check_intact, inside_own_folders, read_run_json
from pws_batch.batch.schema import MEDIA_COLUMNS, media_extension

PAGE_SIZE = 24
# Shown on every card; every other non-media column goes into its "parameters" list.
HEADLINE = ("pair_id", "image_prompt", "audio_prompt", "clip_score", "clap_score", "seed", "candidate_index", "rank")
HIDDEN = {"effective_image_prompt", "shard", "manifest_row", "model_image", "model_audio", "model_vocoder",
          "model_clip", "model_clap", "generate_s", "rank_s", "unet_evals"}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return None if isinstance(value, float) and math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


ORDER_COLUMNS = ("pair_id", "candidate_index", "clip_score", "clap_score")


def read_rows(out: Output, top: int | None = None, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """The kept rows without media, best first (CLIP + CLAP), each with `_part` and `_index` to find its media:
    every non-media column, or only `columns` (and those that order the rows). With `top`, only the best `top`
    rows are held while the parts are read, one part at a time."""
    return best_rows(out, top, columns)[0]


def best_rows(out: Output, top: int | None = None, columns: list[str] | None = None
              ) -> tuple[list[dict[str, Any]], int]:
    """read_rows, and how many kept rows the dataset holds."""
    rows: list[dict[str, Any]] = []
    total = 0
    for part in [p for p in out.list("data") if p.endswith(".parquet")]:
        if columns is None:
            with out.fs.open(out.path("data", part), "rb") as f:
                names = [n for n in pq.read_schema(f).names if n not in MEDIA_COLUMNS]
        else:  # a column a part lacks is left out by read_table
            names = list(dict.fromkeys([*columns, *ORDER_COLUMNS]))
        found = [{**row, "_part": part, "_index": i}
                 for i, row in enumerate(out.read_table(f"data/{part}", names).to_pylist())]
        total += len(found)
        rows = best(rows + found, top) if top is not None else rows + found
    rows.sort(key=best_order)
    return rows, total


def media_of(out: Output, rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, dict]]:
    """{(part, index): {"image": {bytes, path}, "audio": {...}}} for the given rows only, one read per part."""
    wanted: dict[str, list[int]] = {}
    for r in rows:
        wanted.setdefault(r["_part"], []).append(r["_index"])
    media = {}
    for part, indices in wanted.items():
        table = out.read_table(f"data/{part}", list(MEDIA_COLUMNS)).take(sorted(indices))
        for index, row in zip(sorted(indices), table.to_pylist()):
            media[(part, index)] = row
    return media


MEDIA_LIST = "gallery.json"  # beside index.html: the media files the page uses (only those are ever removed)


def _earlier_media(site: Output) -> list[str]:
    """The media files an earlier page written to `site` listed ([] without one, or an unreadable list)."""
    try:
        listed = json.loads(site.read_bytes(MEDIA_LIST)).get("media", []) if site.exists(MEDIA_LIST) else []
    except (ValueError, AttributeError, OSError):
        return []
    return [rel for rel in listed if isinstance(rel, str) and rel.startswith("media/") and ".." not in rel]


def write_gallery(uri: str, top: int | None = None, dest: str | None = None, page_size: int = PAGE_SIZE) -> str:
    """Write the gallery of the dataset at `uri`; returns where index.html is."""
    out = Output(uri)
    if not out.exists("run.json"):
        raise FileNotFoundError(f"{uri} holds no run.json: not a pws-batch dataset (or the run never started)")
    if top is not None and top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    run = read_run_json(out)  # DatasetError (one line) when it is cut off
    check_intact(out)
    if dest is not None and (folder := inside_own_folders(out, dest)):
        raise DatasetError(f"--out {dest} is inside the dataset's {folder}/ folder, which its "
                           f"readers read whole; write the gallery elsewhere (default: {uri.rstrip('/')}/gallery)")
    if dest is not None and dest.startswith("memory://"):
        raise DatasetError(f"--out {dest} lives in this process's memory only: the page would be gone when the "
                           f"command ends; give a folder")
    rows = read_rows(out, top)
    media = media_of(out, rows)
    site = Output(dest or out.uri + "/gallery")
    earlier = _earlier_media(site)  # what an earlier page of ours wrote here (a larger --top): not this page's
    items = []
    for n, row in enumerate(rows):
        m = media.get((row["_part"], row["_index"]), {})
        image_ext, audio_ext = media_extension(m.get("image"), "png"), media_extension(m.get("audio"), "wav")
        item = {"n": n, "image": f"media/{n:05d}.{image_ext}", "audio": f"media/{n:05d}.{audio_ext}",
                **{k: _plain(row.get(k)) for k in HEADLINE},
                "params": {k: _plain(v) for k, v in row.items()
                           if k not in HEADLINE and k not in HIDDEN and not k.startswith("_") and v is not None}}
        if (m.get("image") or {}).get("bytes") is not None:
            site.write_bytes(item["image"], m["image"]["bytes"])
        if (m.get("audio") or {}).get("bytes") is not None:
            site.write_bytes(item["audio"], m["audio"]["bytes"])
        items.append(item)
    site.write_bytes("index.html", page(run.get("name") or uri, uri, items, page_size).encode())
    written = sorted({item[k] for item in items for k in ("image", "audio")})
    for rel in sorted(set(earlier) - set(written)):
        if site.exists(rel):
            site.fs.rm(site.path(rel))
    site.write_bytes(MEDIA_LIST, json.dumps({"media": written}, indent=1).encode())
    return site.path("index.html") if "://" not in site.uri else site.uri + "/index.html"


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def thumbnail_png(data: bytes, width: int = 496) -> bytes:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L")
        im.thumbnail((width, width))
        buffer = io.BytesIO()
        im.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()


def markdown_summary(uri: str, top: int = 4, max_chars: int = 2_000_000,
                     kept: tuple[list[dict[str, Any]], int] | None = None) -> str:
    """A bounded markdown table of the `top` best kept rows with data-URI thumbnails and `<audio>` players, for
    the Prefect UI: rows are added while the text stays under `max_chars` (the rest are counted, not shown).

    `kept`: (the best kept rows, in card.best_order, with their prompts, seed, scores, `_part` and `_index`; the
    number of kept rows), as finalize already has them (its summary's kept_rows and counts): then only the media
    of the rows shown are read. Without it the rows are read from the data parts (a few columns of each)."""
    from pws_batch.batch.run import flac_of

    out = Output(uri)
    if kept is not None:
        best, total = kept[0][:top], kept[1]
    else:
        best, total = best_rows(out, top, ["image_prompt", "audio_prompt", "seed"])
    media = media_of(out, best)
    lines = [f"# Best {len(best)} of {total} kept rows (CLIP + CLAP)", "",
             "| picture and sound | prompts | scores |", "|---|---|---|"]
    size = sum(len(line) + 1 for line in lines)
    shown = 0
    for row in best:
        m = media.get((row["_part"], row["_index"]), {})
        image, audio = (m.get("image") or {}).get("bytes"), (m.get("audio") or {}).get("bytes")
        cell = ""
        if image:
            cell += f'<img src="{data_uri(thumbnail_png(image), "image/png")}" width="496">'
        if audio:
            # lossless and smaller than the WAV: more players fit the bound
            flac = audio if media_extension(m.get("audio"), "wav") == "flac" else flac_of(audio)
            cell += f'<br><audio controls src="{data_uri(flac, "audio/flac")}"></audio>'
        text = lambda v: html.escape(str(v)).replace("|", "&#124;")  # noqa: E731
        line = (f"| {cell} | **{text(row.get('pair_id'))}**<br>picture: {text(row.get('image_prompt'))}<br>"
                f"sound: {text(row.get('audio_prompt'))} | CLIP {row.get('clip_score', 0):.4f}<br>"
                f"CLAP {row.get('clap_score', 0):.4f}<br>seed {row.get('seed')} |")
        if size + len(line) + 1 > max_chars:
            break
        lines.append(line)
        size += len(line) + 1
        shown += 1
    if shown < total:
        lines += ["", f"{total - shown} more in `pws-batch gallery {uri}`."]
    return "\n".join(lines)


def page(title: str, uri: str, items: list[dict[str, Any]], page_size: int = PAGE_SIZE) -> str:
    # JSON inside <script>: with <, > and & as \u escapes no text in it (`</script>`, `<!--<script>`) can end or
    # change the script element, and JSON.parse reads the same strings back
    data = json.dumps(items, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("&", "\\u0026")
    return TEMPLATE.replace("__TITLE__", html.escape(str(title))).replace("__URI__", html.escape(str(uri))) \
        .replace("__COUNT__", count_text(items)).replace("__PAGE_SIZE__", str(int(page_size))) \
        .replace("__DATA__", data)


def count_text(rows: list[dict[str, Any]]) -> str:
    """"N kept pairs" (one row per pair), else "R kept candidates of N pairs" (a run with --keep > 1)."""
    pairs = len({r.get("pair_id") for r in rows})
    return f"{pairs} kept pairs" if pairs == len(rows) else f"{len(rows)} kept candidates of {pairs} pairs"


TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__ - pws-batch gallery</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }
header { display: flex; flex-wrap: wrap; gap: 1rem; align-items: baseline; }
h1 { font-size: 1.3rem; margin: 0; }
.controls { display: flex; gap: .5rem; align-items: center; margin: 1rem 0; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 1rem; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .7rem; }
.card img { width: 100%; image-rendering: pixelated; background: #000; display: block; }
.card audio { width: 100%; margin: .4rem 0; }
.prompt { margin: .15rem 0; }
.label { color: #777; font-size: .8rem; }
.scores { font-variant-numeric: tabular-nums; font-size: .9rem; }
details { font-size: .8rem; color: #444; }
details table td { padding: 0 .6rem 0 0; vertical-align: top; }
</style>
</head>
<body>
<header><h1>__TITLE__</h1><span class="label" id="count">__COUNT__ of <code>__URI__</code></span></header>
<div class="controls">
  <label>sort by <select id="sort">
    <option value="total">CLIP + CLAP</option><option value="clip_score">CLIP score</option>
    <option value="clap_score">CLAP score</option><option value="pair_id">pair id</option>
  </select></label>
  <button id="prev">&larr; previous</button><span id="pageinfo"></span><button id="next">next &rarr;</button>
</div>
<div id="grid"></div>
<script type="application/json" id="data">__DATA__</script>
<script>
(function () {
  const items = JSON.parse(document.getElementById("data").textContent);
  const pageSize = __PAGE_SIZE__;
  let order = items.slice(), pageIndex = 0;
  const num = (v) => (typeof v === "number" && isFinite(v) ? v : 0);
  const fmt = (v) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(4)) : (v === null ? "" : typeof v === "object" ? JSON.stringify(v) : String(v)));
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function card(it) {
    const c = el("div", "card");
    c.dataset.pairId = it.pair_id; c.dataset.clip = it.clip_score; c.dataset.clap = it.clap_score;
    const img = el("img"); img.src = it.image; img.alt = it.image_prompt || ""; img.loading = "eager";
    const audio = el("audio"); audio.controls = true; audio.preload = "metadata"; audio.src = it.audio;
    c.append(img, audio);
    const p1 = el("div", "prompt"); p1.append(el("span", "label", "picture: "), document.createTextNode(it.image_prompt || ""));
    const p2 = el("div", "prompt"); p2.append(el("span", "label", "sound: "), document.createTextNode(it.audio_prompt || ""));
    c.append(p1, p2, el("div", "scores", "CLIP " + fmt(it.clip_score) + "  CLAP " + fmt(it.clap_score) +
      "  seed " + fmt(it.seed) + "  candidate " + fmt(it.candidate_index) + "  rank " + fmt(it.rank)));
    const d = el("details"); d.append(el("summary", null, it.pair_id + ": parameters"));
    const t = el("table");
    for (const [k, v] of Object.entries(it.params)) {
      const tr = el("tr"); tr.append(el("td", "label", k), el("td", null, fmt(v))); t.append(tr);
    }
    d.append(t); c.append(d);
    return c;
  }
  function render() {
    const pages = Math.max(1, Math.ceil(order.length / pageSize));
    pageIndex = Math.min(Math.max(pageIndex, 0), pages - 1);
    const grid = document.getElementById("grid");
    grid.replaceChildren(...order.slice(pageIndex * pageSize, (pageIndex + 1) * pageSize).map(card));
    document.getElementById("pageinfo").textContent = " page " + (pageIndex + 1) + " of " + pages + " ";
    document.getElementById("prev").disabled = pageIndex === 0;
    document.getElementById("next").disabled = pageIndex >= pages - 1;
  }
  function sortBy(key) {
    const value = key === "total" ? (it) => num(it.clip_score) + num(it.clap_score) : (it) => it[key];
    order = items.slice().sort((a, b) => key === "pair_id" ? String(a.pair_id).localeCompare(String(b.pair_id))
                                                            : num(value(b)) - num(value(a)));
    pageIndex = 0;
    render();
  }
  document.getElementById("sort").addEventListener("change", (e) => sortBy(e.target.value));
  document.getElementById("prev").addEventListener("click", () => { pageIndex--; render(); });
  document.getElementById("next").addEventListener("click", () => { pageIndex++; render(); });
  window.gallery = { sortBy: sortBy, page: (i) => { pageIndex = i; render(); } };
  sortBy("total");
})();
</script>
</body>
</html>
"""
