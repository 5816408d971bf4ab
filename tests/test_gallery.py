"""The gallery (issue 10, item 3): `pws-batch gallery OUT` opened from disk in headless Chromium shows every
picture, every player has a duration, sorting and pages work; the Prefect summary's markdown is bounded."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import browser
from dataset_maker import make_dataset
from pws_batch.cli import main

PROBE = """
window.addEventListener("load", async () => {
  const cards = () => [...document.querySelectorAll(".card")];
  const loaded = (a) => a.readyState >= 1 ? Promise.resolve() :
    new Promise((r) => { a.addEventListener("loadedmetadata", r); a.addEventListener("error", r); });
  await Promise.all([...document.querySelectorAll("audio")].map(loaded));
  const result = {images: [...document.querySelectorAll("img")].map((i) => i.naturalWidth),
                  durations: [...document.querySelectorAll("audio")].map((a) => a.duration),
                  pageinfo: document.getElementById("pageinfo").textContent.trim(),
                  total: cards().map((c) => Number(c.dataset.clip) + Number(c.dataset.clap)),
                  bold: document.querySelectorAll(".card b").length,
                  sound: document.querySelectorAll(".prompt")[1].textContent,
                  count: document.getElementById("count").textContent,
                  prompts: cards().map((c) => c.querySelector(".prompt").textContent)};
  window.gallery.sortBy("clap_score");
  result.clap = cards().map((c) => Number(c.dataset.clap));
  document.getElementById("next").click();
  result.page2 = cards().length;
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("gallery")
    n = 15
    # prompts that end the page's script data in HTML's parser unless escaped (`<!--<script>`): no card would show
    pq.write_table(pa.table({"image_prompt": [f"a picture {i} <!--<script> & </script>" for i in range(n)],
                             "audio_prompt": [f"a <b>sound</b> {i}" for i in range(n)]}), tmp / "m.parquet")
    out = str(tmp / "out")
    make_dataset(str(tmp / "m.parquet"), out, shard_size=4, keep=2)  # 30 kept rows
    return out


def test_the_gallery_renders_pictures_and_playable_sounds_in_chromium(dataset, capsys):
    assert main(["gallery", dataset]) == 0
    page = os.path.join(dataset, "gallery", "index.html")
    assert capsys.readouterr().out.strip() == f"open {page}"
    with open(page) as f:
        text = f.read()
    assert "http://" not in text and "https://" not in text  # nothing from the network
    result = browser.probe(page, PROBE)
    assert len(result["images"]) == 24 and all(w == 992 for w in result["images"])  # page 1 of 2, all rendered
    assert len(result["durations"]) == 24 and all(abs(d - 1.0) < 0.01 for d in result["durations"])
    assert result["pageinfo"] == "page 1 of 2"
    assert result["total"] == sorted(result["total"], reverse=True)  # best first
    assert result["clap"] == sorted(result["clap"], reverse=True) and len(set(result["clap"])) > 1
    assert result["page2"] == 6
    assert result["count"].startswith("30 kept candidates of 15 pairs of ")
    assert all(p.endswith(" <!--<script> & </script>") for p in result["prompts"])  # shown as the text it is


def test_gallery_top_and_out(dataset, tmp_path):
    dest = str(tmp_path / "site")
    assert main(["gallery", dataset, "--top", "3", "--out", dest]) == 0
    media = sorted(os.listdir(os.path.join(dest, "media")))
    assert media == ["00000.png", "00000.wav", "00001.png", "00001.wav", "00002.png", "00002.wav"]
    result = browser.probe(os.path.join(dest, "index.html"), PROBE)
    assert len(result["images"]) == 3 and result["pageinfo"] == "page 1 of 1"
    assert result["bold"] == 0 and result["sound"].startswith("sound: a <b>sound</b>")  # prompts shown as text


def test_gallery_of_a_folder_that_is_no_dataset_is_one_line(tmp_path, capsys):
    assert main(["gallery", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no run.json" in err and len(err.strip().splitlines()) == 1
    assert main(["gallery", str(tmp_path), "--top", "0"]) == 2


def test_the_prefect_summary_is_bounded_with_thumbnails_and_players(dataset):
    from pws_batch.batch.gallery import markdown_summary

    text = markdown_summary(dataset, top=4)
    assert text.count("<img src=\"data:image/png;base64,") == 4 and text.count("<audio controls") == 4
    assert "26 more in `pws-batch gallery" in text
    small = markdown_summary(dataset, top=4, max_chars=60_000)
    assert len(small) <= 60_000 + 200 and small.count("<audio") < 4


def test_the_prefect_summary_reads_only_what_it_shows(dataset, monkeypatch):
    """The artifact's rows come from a few columns of each part (never all of them, never the media), and the
    media only of the rows shown: the same best rows, in the same order, as the whole gallery's first ones."""
    from pws_batch.batch.dataset import Output
    from pws_batch.batch.gallery import MEDIA_COLUMNS, markdown_summary, read_rows

    reads: list[tuple[str, list]] = []
    real = Output.read_table
    monkeypatch.setattr(Output, "read_table", lambda self, rel, columns=None: reads.append((rel, columns))
                        or real(self, rel, columns=columns))
    text = markdown_summary(dataset, top=3)
    parts = [p for p in Output(dataset).list("data") if p.endswith(".parquet")]
    rows_reads = [cols for _, cols in reads if not set(cols) & set(MEDIA_COLUMNS)]
    media_reads = [rel for rel, cols in reads if set(cols) & set(MEDIA_COLUMNS)]
    assert len(rows_reads) == len(parts) and all(len(cols) <= 7 for cols in rows_reads)
    assert 1 <= len(media_reads) <= 3
    monkeypatch.setattr(Output, "read_table", real)
    best = read_rows(Output(dataset))[:3]
    assert [text.index(f"**{r['pair_id']}**") for r in best] == sorted(text.index(f"**{r['pair_id']}**") for r in best)
    assert read_rows(Output(dataset), top=3) == best


def test_the_prefect_summary_from_finalizes_rows_reads_only_the_media_it_shows(dataset, monkeypatch):
    """The flow hands the summary finalize's best rows (read once, with where each row is): the same markdown as
    reading the dataset, and the only reads are the media of the rows shown."""
    from pws_batch.batch.card import CARD_COLUMNS, best
    from pws_batch.batch.dataset import Output
    from pws_batch.batch.gallery import MEDIA_COLUMNS, markdown_summary
    from pws_batch.batch.run import read_kept

    table = read_kept(Output(dataset), CARD_COLUMNS, locate=True)
    rows = table.to_pylist()
    assert {(r["_part"], r["_index"]) for r in rows} == {
        (p, i) for p in Output(dataset).list("data") if p.endswith(".parquet")
        for i in range(pq.read_metadata(os.path.join(dataset, "data", p)).num_rows)}
    kept = (best(rows, 50), len(rows))
    expected = markdown_summary(dataset, top=3)
    reads: list[tuple[str, list]] = []
    real = Output.read_table
    monkeypatch.setattr(Output, "read_table", lambda self, rel, columns=None: reads.append((rel, columns))
                        or real(self, rel, columns=columns))
    assert markdown_summary(dataset, top=3, kept=kept) == expected
    assert 1 <= len(reads) <= 3 and all(set(cols) <= set(MEDIA_COLUMNS) for _, cols in reads)


def test_screenshot_of_the_gallery(dataset, tmp_path):
    assert main(["gallery", dataset, "--top", "6", "--out", str(tmp_path)]) == 0
    png = str(tmp_path / "shot.png")
    browser.screenshot(str(tmp_path / "index.html"), png)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (1280, 1000)
        assert len(set(im.convert("L").getdata())) > 16  # not a blank page
