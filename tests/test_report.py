"""The QC report in OUT (nucleibatch.report, `nucleibatch report OUT`).

A real small OUT (the shipped model on two DSB demo images, a grey fluorescence and an H&E
one, plus a zero-byte PNG that fails) must give a report whose sections, counts and failed
list agree with the images table, whose pictures are embedded JPEGs with the outlines where the
labels' boundaries are, and that references nothing outside itself. A whole-slide-sized OUT
(written with the store's own writers) must be shown as a pyramid level plus a full-resolution
crop of its densest area. Partial outputs still give a report; a folder that is not a segment
output is refused (exit status 2). Finally Debian's chromium loads the report headless: no
console message, no script error, every picture decoded.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.segmentation import find_boundaries

from nucleibatch.cli import main
from nucleibatch.errors import NotSegmentOutputError, UsageError
from nucleibatch.output.folder import MASKS, REPORT, RUN, OutputFolder, label_path
from nucleibatch.output.reader import sample_nuclei
from nucleibatch.report import write_report
from nucleibatch.report.drawing import (
    OUTLINE_RGB,
    densest_window,
    display_range,
    draw_box,
    draw_outlines,
    encode_jpeg,
    histogram_svg,
    to_display_rgb,
)
from nucleibatch.report.gather import CROP_SIDE, NUCLEI_COLUMNS_USED, sample_ids
from tests.helpers.outputs import DEMO_OUT_IDS


class _Page(HTMLParser):
    """Every tag with its attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.stack: list[str] = []
        self.in_gallery = 0

    def handle_starttag(self, tag, attrs):
        attributes = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attributes | {"_in_gallery": str(bool(self.in_gallery))}))
        if tag == "div" and "gallery" in attributes.get("class", "").split():
            self.in_gallery += 1
            self.stack.append("gallery")
        elif tag not in ("img", "br", "meta", "rect", "line", "input"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if self.stack:
            if self.stack.pop() == "gallery":
                self.in_gallery -= 1


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def decode(src: str) -> np.ndarray:
    assert src.startswith("data:image/jpeg;base64,"), src[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def card(text: str, name: str) -> str:
    match = re.search(rf'<div class="card" data-name="{name}"><b>(?:<span[^>]*>)?([^<]*)', text)
    assert match, f"no summary card {name!r}"
    return match.group(1).replace(",", "")


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def report(demo_segment_out) -> tuple[Path, str]:
    path = write_report(demo_segment_out)
    assert path == OutputFolder(demo_segment_out).report
    return path, path.read_text()


def test_report_sections_and_counts_match_the_tables(demo_segment_out, report):
    _, text = report
    images = pd.read_parquet(OutputFolder(demo_segment_out).images)
    nuclei = pd.read_parquet(OutputFolder(demo_segment_out).nuclei)
    for anchor in ("summary", "gallery", "extremes", "histograms", "failed"):
        assert f'<section id="{anchor}">' in text
    ok = images[images.status == "ok"]
    assert int(card(text, "images")) == len(images) == 3
    assert int(card(text, "ok")) == len(ok) == 2
    assert int(card(text, "failed")) == int((images.status == "failed").sum()) == 1
    assert int(card(text, "nuclei")) == int(ok.n_nuclei.sum()) == len(nuclei) > 0
    run = json.loads(OutputFolder(demo_segment_out).run_json.read_text())
    assert run["model"]["sha256"][:12] in text and run["model"]["name"] in text
    assert f"{run['engine']} / {run['device']}" in text
    # the failed image, with its reason, in the failed table
    failed = images[images.status == "failed"].iloc[0]
    table = text.split('id="failed-table"', 1)[1].split("</table>", 1)[0]
    assert failed.image_id in table and failed.error and failed.error in table
    # histograms: one SVG each, over every nucleus (a small run is not sampled)
    assert text.count('<svg class="hist"') == 4
    assert f"n = {len(nuclei):,}," in text
    assert f"n = {len(ok)}," in text  # nuclei per image, over the ok images


def test_report_embeds_everything_and_references_nothing_outside(report):
    _, text = report
    page = parse(text)
    sources = [a["src"] for t, a in page.tags if "src" in a]
    links = [a["href"] for t, a in page.tags if "href" in a]
    assert sources and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert all(h.startswith("#") for h in links), links
    assert not [t for t, _ in page.tags if t in ("link", "iframe", "object", "embed")]
    assert not re.search(r"url\(|@import|https?://", text), "nothing may be fetched from outside"
    for tag, attributes in page.tags:
        if tag == "img":  # every picture decodes, at the size the page declares
            pixels = decode(attributes["src"])
            assert pixels.shape[:2] == (int(attributes["height"]), int(attributes["width"]))
    gallery = [a for t, a in page.tags if t == "img" and a["_in_gallery"] == "True"]
    assert sorted(a["alt"] for a in gallery) == sorted(DEMO_OUT_IDS)
    assert len(text) < 5_000_000


def test_gallery_outlines_lie_on_the_label_boundaries(demo_segment_out, report):
    """Decode each gallery picture and compare it with the labels in the masks store: the outline
    colour is on the labels' boundaries and nowhere else (catches shifted or transposed overlays)."""
    import zarr

    _, text = report
    images = pd.read_parquet(OutputFolder(demo_segment_out).images).set_index("image_id")
    root = zarr.open_group(str(OutputFolder(demo_segment_out).masks), mode="r")
    page = parse(text)
    for tag, attributes in page.tags:
        if tag != "img" or attributes["_in_gallery"] != "True":
            continue
        shown = decode(attributes["src"]).astype(np.int32)
        labels = root[images.loc[attributes["alt"], "store_path"]][label_path(0)][:]
        assert shown.shape[:2] == labels.shape  # small images are shown 1:1
        edge = find_boundaries(labels, mode="inner")
        green = np.abs(shown - np.array(OUTLINE_RGB)).sum(axis=2) < 90  # JPEG is lossy
        assert edge.sum() > 100
        assert green[edge].mean() > 0.9, "outline colour on the boundaries"
        assert green[~edge].mean() < 0.01, "and hardly anywhere else"


def test_extremes_show_fewest_and_most(demo_segment_out, report):
    _, text = report
    ok = pd.read_parquet(OutputFolder(demo_segment_out).images).query("status == 'ok'").sort_values("n_nuclei")
    fewest = text.split('data-kind="fewest nuclei"', 1)[1].split("</div>", 1)[0]
    most = text.split('data-kind="most nuclei"', 1)[1].split("</div>", 1)[0]
    assert re.findall(r'data-image-id="([^"]+)"', fewest)[0] == ok.image_id.iloc[0]
    assert re.findall(r'data-image-id="([^"]+)"', most)[0] == ok.image_id.iloc[-1]
    assert fewest.count("<img") == len(ok) and most.count("<img") == len(ok)


def test_cli_report_rebuilds(demo_segment_out, capsys):
    path = OutputFolder(demo_segment_out).report
    path.write_text("stale")
    assert main(["report", str(demo_segment_out)]) == 0
    assert str(path) in capsys.readouterr().out
    assert path.read_text().startswith("<!DOCTYPE html>")
    assert not list(demo_segment_out.glob(f".{REPORT}.tmp-*"))


@pytest.mark.parametrize("kind", ["missing", "file", "empty folder"])
def test_bad_out_is_refused_with_exit_status_2(tmp_path, capsys, kind):
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("not a folder")
    elif kind == "empty folder":
        target.mkdir()
    with pytest.raises(NotSegmentOutputError) as caught:
        write_report(target)
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == 2
    assert main(["report", str(target)]) == 2
    error = capsys.readouterr().err
    assert "nucleibatch report: error:" in error and "nucleibatch segment" in error and str(target) in error
    assert not OutputFolder(target).report.exists() if target.is_dir() else True


def test_partial_output_still_gives_a_report(demo_segment_out, tmp_path):
    """A run killed before its tables: no run summary, no images table, a nuclei part damaged,
    one image's group gone. The report is written, counts the completion records and says what is missing."""
    out = tmp_path / "partial"
    shutil.copytree(demo_segment_out, out)
    images = pd.read_parquet(OutputFolder(out).images)
    OutputFolder(out).run_json.unlink()
    OutputFolder(out).images.unlink()
    ok = images[images.status == "ok"].sort_values("image_id")
    broken, gone = ok.store_path.iloc[0], ok.store_path.iloc[1]
    OutputFolder(out).nuclei_part(broken).write_bytes(b"PAR1 not really")
    shutil.rmtree(OutputFolder(out).masks / gone)
    text = write_report(out).read_text()
    assert int(card(text, "images")) == len(images) and int(card(text, "failed")) == 1
    assert f"{RUN}</td><td><span class=\"bad\">missing" in text
    assert f"Unreadable parts skipped: {OutputFolder(out).nuclei_part(broken).name}" in text
    assert f"not in {MASKS}" in text
    nuclei = pd.read_parquet(OutputFolder(demo_segment_out).nuclei)
    survivors = nuclei[nuclei.image_id != ok.image_id.iloc[0]]
    assert f"n = {len(survivors):,}," in text


def test_histogram_sample_is_an_even_stride_over_the_table(demo_segment_out):
    parts = sorted(p for p in OutputFolder(demo_segment_out).nuclei.glob("*.parquet"))
    table = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    data, total, problems = sample_nuclei(demo_segment_out, NUCLEI_COLUMNS_USED, max_rows=7)
    stride = -(-len(table) // 7)
    assert total == len(table) and not problems
    np.testing.assert_array_equal(data["area"], table.area.to_numpy()[::stride])
    np.testing.assert_array_equal(data["eccentricity"], table.eccentricity.to_numpy()[::stride])
    assert len(data["area"]) <= 7


# --------------------------------------------------------------------------- a whole slide


def write_slide_out(out: Path, store_image: bool) -> tuple[str, tuple[int, int, int, int]]:
    """An OUT holding one 2200x2200 uint16 image (pyramid levels 0, 1, 2) with a dense cluster
    of nuclei in one 512 px square and a few elsewhere, written with the store's own writers.
    Returns the image's store path and the cluster's box (y0, y1, x0, x1)."""
    from nucleibatch.measure import measure_labels
    from nucleibatch.output.store import create_image_group, label_array, open_root, write_pyramids
    from nucleibatch.synthetic import synthetic_nuclei

    shape, cluster = (2200, 2200), (1500, 2012, 300, 812)
    image = np.full(shape, 300, np.uint16)
    labels = np.zeros(shape, np.uint32)
    pieces = [(cluster, 60, 1), ((100, 356, 1700, 1956), 3, 2), ((900, 1156, 1000, 1256), 3, 3)]
    for (y0, y1, x0, x1), n, seed in pieces:
        tile_image, tile_labels = synthetic_nuclei((y1 - y0, x1 - x0), n_nuclei=n, seed=seed, dtype=np.uint16)
        image[y0:y1, x0:x1] = np.maximum(image[y0:y1, x0:x1], tile_image)
        offset = int(labels.max())
        labels[y0:y1, x0:x1] = np.where(tile_labels > 0, tile_labels.astype(np.uint32) + offset, 0)
    out.mkdir(parents=True)
    root = open_root(OutputFolder(out).masks)
    group = create_image_group(root, "slide", "slide", shape, 1, np.dtype(np.uint16), chunk=512)
    if store_image:
        group["0"][0] = image
    label_array(group)[:] = labels
    write_pyramids(group, chunk=512)
    columns = measure_labels(labels.astype(np.int64), image.astype(np.float32))
    nuclei = pd.DataFrame({"image_id": "slide", **columns})
    OutputFolder(out).nuclei.mkdir()
    nuclei.to_parquet(OutputFolder(out).nuclei_part("slide"))
    row = dict(image_id="slide", source="slide.tif", height=shape[0], width=shape[1], n_nuclei=len(nuclei), status="ok", error=None, seconds=1.0, store_path="slide")
    pd.DataFrame([row]).to_parquet(OutputFolder(out).images)
    OutputFolder(out).run_json.write_text(json.dumps({"engine": "local", "device": "cpu", "settings": {"store_image": store_image}}))
    return "slide", cluster


@pytest.mark.parametrize("store_image", [True, False], ids=["image", "no-store-image"])
def test_whole_slide_is_shown_as_a_pyramid_level_and_a_crop_of_its_densest_area(tmp_path, store_image):
    out = tmp_path / "slide_out"
    _, (cy0, cy1, cx0, cx1) = write_slide_out(out, store_image)
    text = write_report(out).read_text()
    gallery = [a for t, a in parse(text).tags if t == "img" and a["_in_gallery"] == "True"]
    assert len(gallery) == 2, "a downsampled whole view and a full-resolution crop"
    overview, crop = gallery
    assert "pyramid level 2" in overview["title"]  # 2200 -> 1100 -> 550: the lowest <= 1024
    assert (int(overview["width"]), int(overview["height"])) == (550, 550)
    y0, y1, x0, x1 = (int(v) for v in crop["data-crop"].split(","))
    assert (y1 - y0, x1 - x0) == (CROP_SIDE, CROP_SIDE) == decode(crop["src"]).shape[:2]
    inside = max(0, min(y1, cy1) - max(y0, cy0)) * max(0, min(x1, cx1) - max(x0, cx0))
    assert inside >= 0.75 * CROP_SIDE**2, "the crop lies on the dense cluster"
    overview_pixels = decode(overview["src"]).astype(np.int32)
    magenta = np.abs(overview_pixels - np.array([255, 0, 255])).sum(axis=2) < 120
    rows, cols = np.nonzero(magenta)
    assert abs(rows.min() * 4 - y0) <= 8 and abs(cols.min() * 4 - x0) <= 8, "the box marks the crop on the overview"
    crop_pixels = decode(crop["src"])
    if store_image:
        assert "image not stored" not in text
        assert crop_pixels.mean() > 30  # nuclei visible (16-bit stretched by percentiles)
    else:
        assert "image not stored (--no-store-image)" in text
        background = np.abs(crop_pixels.astype(np.int32) - 24).sum(axis=2) < 30
        assert background.mean() > 0.5  # outlines on a flat dark background


# --------------------------------------------------------------------------- pure functions


def test_display_range_and_rgb_for_16_bit_float_and_colour():
    rng = np.random.default_rng(0)
    deep = rng.integers(1000, 3000, (1, 40, 50)).astype(np.uint16)
    low, high = display_range(deep)
    assert 1000 <= low < high <= 3000
    grey = to_display_rgb(deep, (low, high))
    assert grey.shape == (40, 50, 3) and grey.dtype == np.uint8
    assert (grey[..., 0] == grey[..., 2]).all() and grey.min() == 0 and grey.max() == 255
    floats = rng.random((2, 30, 30)).astype(np.float32)
    floats[0, 0, 0] = np.nan
    shown = to_display_rgb(floats, display_range(floats), channel=1)
    np.testing.assert_array_equal(shown[..., 0], to_display_rgb(floats[1:], display_range(floats))[..., 0])
    rgba = rng.integers(0, 255, (4, 8, 9)).astype(np.uint8)
    colour = to_display_rgb(rgba, (0, 255))
    np.testing.assert_array_equal(colour, np.moveaxis(rgba[:3], 0, -1))
    assert display_range(np.full((5, 5), 7.0)) == (7.0, 8.0)


def test_draw_outlines_and_box_change_only_their_pixels():
    rgb = np.full((20, 30, 3), 10, np.uint8)
    labels = np.zeros((20, 30), np.int32)
    labels[5:10, 5:12] = 1
    drawn = draw_outlines(rgb, labels)
    changed = (drawn != rgb).any(axis=2)
    np.testing.assert_array_equal(changed, find_boundaries(labels, mode="inner"))
    assert tuple(drawn[5, 5]) == OUTLINE_RGB and (rgb == 10).all(), "input untouched"
    boxed = draw_box(rgb, (2, 8, 3, 9), width=1)
    ring = (boxed != rgb).any(axis=2)
    assert ring[2, 3:9].all() and ring[7, 3:9].all() and ring[2:8, 3].all() and ring[2:8, 8].all()
    assert ring.sum() == 2 * 6 + 2 * 4
    with pytest.raises(ValueError):
        draw_outlines(rgb, labels[:10])


def test_densest_window_finds_the_cluster_and_stays_inside():
    rng = np.random.default_rng(1)
    sparse = rng.uniform(0, 3000, (40, 2))
    cluster = rng.uniform(0, 300, (200, 2)) + [2400, 600]
    y0, x0 = densest_window(np.vstack([sparse, cluster]), (3000, 3000), 512)
    assert y0 <= 2400 and y0 + 512 >= 2700 and x0 <= 600 and x0 + 512 >= 900
    assert densest_window(np.array([[2990.0, 2990.0]]), (3000, 2000), 512) == (2488, 1488)
    assert densest_window(np.zeros((0, 2)), (1000, 3000), 512) == (244, 1244)
    assert densest_window(np.zeros((0, 2)), (300, 200), 512) == (0, 0)


def test_sample_ids_is_deterministic_and_order_free():
    ids = [f"plate/{i}" for i in range(100)]
    first = sample_ids(ids, 12)
    assert len(first) == 12 and first == sorted(first)
    assert sample_ids(reversed(ids), 12) == first
    assert sample_ids(ids[:5], 12) == sorted(ids[:5])


def test_histogram_svg_bars_and_labels():
    values = np.array([1, 2, 2, 3, 3, 3, np.nan])
    svg = histogram_svg(values, "t <x>", integer=True)
    assert "t &lt;x&gt;" in svg and "n = 6," in svg
    heights = sorted(float(h) for h in re.findall(r'<rect [^>]*height="([0-9.]+)"', svg))
    assert len(heights) == 3 and heights[2] == pytest.approx(3 * heights[0], rel=0.01)
    assert ">3</text>" in svg  # the peak count on the y axis
    assert "no data" in histogram_svg(np.array([]), "empty")
    assert "2 outside the range" in histogram_svg(np.array([0.5, 0.7, -1, 2]), "e", value_range=(0, 1))


# --------------------------------------------------------------------------- a real browser


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium not installed: `apt-get install chromium` (.ci/run does it where apt is available)")


def _load_in_chromium(browser: str, page: Path, profile: Path, screenshot: Path | None = None) -> tuple[dict[str, str], str]:
    """Load ``page`` in headless chromium: the ``<body>`` attributes after load, and the console lines."""
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
    run = subprocess.run([*common, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    body = next(a for t, a in parse(run.stdout).tags if t == "body")
    console = "\n".join(line for line in run.stderr.splitlines() if ":CONSOLE" in line)
    if screenshot is not None:
        shot = subprocess.run([*common, "--window-size=1280,2000", f"--screenshot={screenshot}", page.as_uri()], capture_output=True, text=True, timeout=120)
        assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
    return body, console


def test_report_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    path, text = report
    body, console = _load_in_chromium(browser, path, tmp_path / "profile", tmp_path / "shot.png")
    assert body.get("data-report-loaded") == "1", "the page's load handler ran"
    assert body["data-errors"] == "" and console == "", (body["data-errors"], console)
    n_images, n_gallery = text.count("<img "), len(DEMO_OUT_IDS)
    assert (body["data-images"], body["data-images-decoded"]) == (str(n_images), str(n_images))
    assert (body["data-gallery-images"], body["data-gallery-decoded"]) == (str(n_gallery), str(n_gallery))
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB"))
    assert shot.shape == (2000, 1280, 3)
    green = (np.abs(shot.astype(np.int32) - np.array(OUTLINE_RGB)).sum(axis=2) < 60).sum()
    assert green > 500, "the outlines are on the screen"

    # the check sees failures: a broken picture and a script error are reported
    broken = tmp_path / "broken.html"
    first = re.search(r'src="data:image/jpeg;base64,([^"]{40})', text).group(1)
    broken.write_text(text.replace(first, "A" * 40, 1).replace("</body>", "<script>noSuchFunction();</script></body>"))
    body, console = _load_in_chromium(browser, broken, tmp_path / "profile2")
    assert "noSuchFunction" in body["data-errors"] and "failed to load IMG" in body["data-errors"]
    assert "noSuchFunction" in console
    assert int(body["data-images-decoded"]) == n_images - 1



def test_a_busy_full_colour_picture_still_encodes(capfd):
    """Pillow's optimised JPEG encoder gets a buffer of one byte per pixel; a picture busier
    than that (an overview with thousands of coloured outlines; here noise) failed with
    'broken data stream' and the image's report entry was lost. It now gets room for any JPEG
    of the picture, and nothing is printed (libjpeg's 'Suspension not allowed here')."""
    rgb = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    url = encode_jpeg(rgb)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert decoded.shape == rgb.shape
    assert np.abs(decoded.astype(int) - rgb).mean() < 40  # a JPEG of noise, not a blank picture
    assert "Suspension" not in capfd.readouterr().err
