"""The bad-inputs corpus (tests/helpers/bad_corpus.py) through a real `segment` run (issue 5, point 3).

Every corpus item must end as an 'ok' row that passes its sanity checks (all-black and
saturated images: 0 nuclei; the same picture as another dtype, format, file name or channel
layout: the reference's nuclei), or as a 'failed' row whose reason is one line and names the
problem; the run must finish (nothing raised), report exit status 3 (library and CLI), and
refuse every decompression bomb from its header, before any pixel is allocated (checked in a
child process under an address-space limit). The fast oracle model
(``nucleibatch.synthetic.threshold_model``) runs the library job; the CLI run uses the small
random-weight bundle (exit status and failures do not depend on the model).

Rules for discovery-level oddities (what the expectations in bad_corpus.py encode):

* Symbolic link to a file: followed. A link loop (``a -> b -> a``) or a dangling link is a
  failed row, "cannot open (Too many levels of symbolic links)" / "(No such file or
  directory)". A link to a file discovered already (``link -> good.png``) is that file,
  discovered once (under the first name in sorted order).
* Symbolic link to a folder: never followed (so folder loops cannot happen); an INFO log
  line names it. Hidden files, and files with other extensions, are ignored silently.
* A folder that cannot be listed (permissions): its images are skipped, with a WARNING log
  line "cannot list ... its images are skipped". A file that cannot be read (chmod 000): a
  failed row "cannot open (Permission denied)". (Root reads and lists them anyway: then the
  image is simply ok; the corpus detects which case applies.)
* A FIFO, a device (a link to /dev/zero) or a socket with an image extension: a failed row
  "not a regular file" (it is never opened: opening a FIFO waits forever for a writer).
* File names: any bytes. Bytes that are not UTF-8 and unprintable characters (newline,
  tab, ...) are escaped in ``image_id`` and ``source`` (``latin1-caf\\xe9-\\xff``,
  ``new\\nline``), so ids are printable and one line; the file is read under its real
  name. Spaces and non-Latin scripts are kept as they are.
* The content, not the extension, picks the reader: TIFF bytes are read with tifffile
  (lazily), PNG/JPEG/GIF/BMP bytes with PIL; bytes of no known format go to the
  extension's reader, whose failure is the reason. A folder named like an image
  (``x.png/``) is a folder; a folder named ``*.zarr`` without zarr metadata is a failed row.
* Pixel values: NaN and +-inf are left out of the normalisation statistics; NaN and -inf
  read as background, +inf as the brightest value; an image without any finite value is a
  failed row "no finite pixel values"; a nucleus's ``mean_intensity`` averages its finite pixels.
* Size limits refused from the header: PNG/JPEG/GIF/BMP over 10^9 pixels, or a PNG
  declaring more decoded bytes than deflate's 1032:1 limit allows for its file size; any
  image over 10^11 pixels; TIFF uncompressed data ending past the end of the file, tiles
  without offsets, or more than 10^4 bytes of pixels per byte of file (above 10^9 bytes);
  a zarr array above 10^9 bytes with fewer than 1 in 100 chunks stored.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nucleibatch.cli import main
from nucleibatch.io.discover import discover_inputs
from nucleibatch.output.folder import MASKS, OutputFolder
from nucleibatch.segment.job import run_segment_job
from nucleibatch.synthetic import threshold_model
from tests.helpers import bad_corpus
from tests.helpers.outputs import labels_of
from tests.helpers.paths import REPO

# corpus file -> its image id in the corpus run
BOMBS = {
    "bomb.png": "bomb.png",
    "bomb_rgba16.png": "bomb_rgba16",
    "bomb.gif": "bomb.gif",
    "bomb.tif": "bomb.tif",
    "bomb_strip.tif": "bomb_strip",
    "bomb_small.tif": "bomb_small",
    "bomb_ratio.tif": "bomb_ratio",
    "bomb.zarr": "bomb.zarr",
    "sparse_bomb.zarr": "sparse_bomb",
}
MAX_REASON = 300  # characters of a reason, not counting the corpus folder's path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, bad_corpus.Expected]]:
    folder = tmp_path_factory.mktemp("corpus") / "corpus"
    return folder, bad_corpus.write_corpus(folder)


@pytest.fixture(scope="module")
def segmented(corpus, tmp_path_factory):
    """One real local `segment` run of the whole corpus with the threshold oracle model."""
    folder, _ = corpus
    out = tmp_path_factory.mktemp("out") / "out"
    started = time.perf_counter()
    summary = run_segment_job([str(folder)], out, model=threshold_model(), progress=False)
    seconds = time.perf_counter() - started
    images = pd.read_parquet(OutputFolder(out).images)
    nuclei = pd.read_parquet(OutputFolder(out).nuclei)
    return summary, images, nuclei, out, seconds


def test_run_finishes_with_exit_status_3(segmented, corpus):
    summary, images, _, out, seconds = segmented
    _, expected = corpus
    rows = [e for e in expected.values() if e.outcome != "skipped"]
    assert summary.exit_code == 3
    assert (summary.n_images, summary.n_failed) == (len(rows), sum(e.outcome == "failed" for e in rows))
    counts = json.loads(OutputFolder(out).run_json.read_text())["counts"]
    assert (counts["images"], counts["ok"], counts["failed"]) == (len(rows), summary.n_ok, summary.n_failed)
    assert OutputFolder(out).report.is_file()
    assert seconds < 60, f"{len(rows)} small images took {seconds:.0f} s: a bomb or a hang was not refused"


def test_every_item_ends_as_expected(segmented, corpus):
    _, images, nuclei, out, _ = segmented
    folder, expected = corpus
    rows = images.set_index("image_id")
    wanted = {i for i, e in expected.items() if e.outcome != "skipped"}
    assert set(rows.index) == wanted, f"unexpected rows {sorted(set(rows.index) - wanted)}, missing {sorted(wanted - set(rows.index))}"
    problems = []
    for image_id, item in sorted(expected.items()):
        if item.outcome == "skipped":
            continue
        row = rows.loc[image_id]
        if row["status"] != item.outcome:
            problems.append(f"{image_id!r}: {row['status']} ({row['error']}), expected {item.outcome} ({item.note})")
            continue
        if item.outcome == "failed":
            error = row["error"]
            missing = [w for w in item.words if w not in error]
            if missing:
                problems.append(f"{image_id!r}: reason {error!r} lacks {missing}")
            if row["n_nuclei"] != 0 or not pd.isna(row["store_path"]) or (nuclei["image_id"] == image_id).any():
                problems.append(f"{image_id!r}: failed but has nuclei or a {MASKS} group")
            continue
        labels = labels_of(out, image_id)
        table = nuclei[nuclei["image_id"] == image_id]
        if labels.shape != (row["height"], row["width"]) or labels.dtype != np.uint32:
            problems.append(f"{image_id!r}: labels {labels.shape} {labels.dtype} for a {row['height']}x{row['width']} image")
        if set(np.unique(labels[labels > 0]).tolist()) != set(table["label"].tolist()) or len(table) != row["n_nuclei"]:
            problems.append(f"{image_id!r}: labels, nuclei table and n_nuclei disagree")
        if item.nuclei == "none" and row["n_nuclei"] != 0:
            problems.append(f"{image_id!r}: {row['n_nuclei']} nuclei in an image without any ({item.note})")
        if item.nuclei == "some" and row["n_nuclei"] == 0:
            problems.append(f"{image_id!r}: no nuclei found ({item.note})")
    assert not problems, "\n".join(problems)


def test_failed_rows_have_a_one_line_reason(segmented, corpus):
    _, images, _, _, _ = segmented
    folder, _ = corpus
    failed = images[images["status"] == "failed"]
    assert len(failed) > 30
    for image_id, error in zip(failed["image_id"], failed["error"], strict=True):
        assert isinstance(error, str) and error.strip(), image_id
        assert "\n" not in error and "\r" not in error, (image_id, error)
        assert error.isprintable(), (image_id, error)
        assert len(error.replace(str(folder), "")) <= MAX_REASON, (image_id, len(error), error)
        assert "Traceback" not in error and "MemoryError" not in error, (image_id, error)
    # ids and sources are printable one-liners too, whatever the file names
    assert all(text.isprintable() for column in ("image_id", "source") for text in images[column]), "unprintable id or source"


def test_same_picture_gives_the_same_nuclei(segmented, corpus):
    """Another dtype (int8, int32, float16, 16-bit with 5 grey levels, floats with NaN / inf),
    format (JPEG, BMP, GIF, palette, RGBA, TIFF named .png), name or channel layout of the
    reference picture: the oracle model finds the reference's nuclei (foreground IoU >= 0.95)."""
    _, _, _, out, _ = segmented
    _, expected = corpus
    reference = labels_of(out, bad_corpus.REFERENCE) > 0
    assert reference.any()
    checked = 0
    for image_id, item in expected.items():
        if item.like is None or item.outcome != "ok":
            continue
        found = labels_of(out, image_id) > 0
        assert found.shape == reference.shape, image_id
        iou = (found & reference).sum() / (found | reference).sum()
        assert iou >= 0.95, f"{image_id!r}: foreground IoU {iou:.3f} with {bad_corpus.REFERENCE} ({item.note})"
        checked += 1
    assert checked >= 20


def test_non_finite_pixels_are_background_not_nan(segmented):
    """NaN / inf pixels: left out of the statistics (the rest of the image normalises as
    without them), never NaN in the labels; an all-NaN image fails with its reason."""
    _, images, _, out, _ = segmented
    rows = images.set_index("image_id")
    for image_id in ("float_nan", "float_inf"):
        labels = labels_of(out, image_id)
        assert rows.loc[image_id, "status"] == "ok" and labels.max() > 0
    assert "no finite pixel values" in rows.loc["float_all_nan", "error"]


def test_mean_intensity_ignores_non_finite_pixels(segmented):
    _, _, nuclei, _, _ = segmented
    table = nuclei[nuclei["image_id"].isin(["float_nan", "float_inf"])]
    assert len(table) > 0 and np.isfinite(table["mean_intensity"]).all()


def test_cli_exit_status_3(corpus, segmented, tiny_bundle, tmp_path):
    """The real CLI over the corpus: exit status 3, and the same images fail for the same
    reasons with another model (failures come from the inputs, not the model)."""
    folder, _ = corpus
    _, reference, _, _, _ = segmented
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-o", str(out), "--model", str(tiny_bundle), "--progress", "log"]) == 3
    images = pd.read_parquet(OutputFolder(out).images).set_index("image_id")
    reference = reference.set_index("image_id")
    assert sorted(images.index) == sorted(reference.index)
    pd.testing.assert_series_equal(images["status"].sort_index(), reference["status"].sort_index())
    failed = reference["status"] == "failed"
    assert images.loc[failed, "error"].sort_index().tolist() == reference.loc[failed, "error"].sort_index().tolist()


def test_discovery_oddities_are_logged(corpus, caplog):
    folder, expected = corpus
    with caplog.at_level(logging.INFO, logger="nucleibatch.io.discover"):
        records = {r.image_id: r for r in discover_inputs([str(folder)])}
    messages = [r.getMessage() for r in caplog.records]
    assert any("links/up" in m and "symbolic link to a folder, not followed" in m for m in messages), messages
    if expected["locked/inside"].outcome == "skipped":
        assert any("cannot list" in m and "locked" in m for m in messages), messages
    # records keep the real name (to open the file) and escape it in the id and source
    latin = records["latin1-caf\\xe9-\\xff"]
    assert os.fsencode(latin.path).endswith(b"latin1-caf\xe9-\xff.png") and latin.source.isprintable()
    assert records["new\\nline"].path.endswith("new\nline.png")
    # the content picked the reader
    assert (records["png_named"].kind, records["tiff_named"].kind) == ("plain", "tiff")


BOMB_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    from nucleibatch.io.discover import discover_inputs
    from nucleibatch.io.readers import open_source
    import PIL.Image, tifffile, zarr  # the decoders, loaded before the limit

    def peak_rss_kb():  # VmHWM: the peak of this program (ru_maxrss would include the forking parent's)
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])

    with open("/proc/self/statm") as statm:
        virtual = int(statm.read().split()[0]) * resource.getpagesize()
    # any allocation beyond 1 GiB more than now fails (MemoryError) instead of succeeding lazily
    resource.setrlimit(resource.RLIMIT_AS, (virtual + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    before, started, errors = peak_rss_kb(), time.perf_counter(), {}
    for path in sys.argv[1:]:
        name = path.rsplit("/", 1)[-1]
        for record in discover_inputs([path]):
            errors[name] = record.error
            if record.error is None:  # must not happen; read it to show what a bomb does
                try:
                    with open_source(record) as source:
                        source.overview()
                except Exception as error:
                    errors[name] = "READ " + str(error)
    print(json.dumps({"errors": errors, "peak_before_kb": before, "peak_kb": peak_rss_kb(), "seconds": time.perf_counter() - started}))
    """
)


def test_decompression_bombs_are_refused_before_allocating(corpus):
    """Each bomb (headers declaring 10^12 pixels, 7 GB of decoded PNG in 74 bytes, 3.6 GB of
    TIFF tiles in 29 kB, a 3.6 GB zarr array of one chunk) is refused at discovery from its
    header, in a child process whose address space is capped at 1 GiB above its start: no
    MemoryError, no growth of the resident set, in well under a second each."""
    folder, expected = corpus
    done = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, *(str(folder / name) for name in BOMBS)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(result["errors"]) == sorted(BOMBS)
    for name, error in result["errors"].items():
        assert error is not None and not error.startswith("READ"), f"{name}: not refused at discovery ({error})"
        assert "declares" in error and "MemoryError" not in error, (name, error)
        for word in expected[BOMBS[name]].words:
            assert word in error, (name, word, error)
    assert result["peak_kb"] - result["peak_before_kb"] < 100 * 1024, result
    assert result["seconds"] < 10, result


def test_generator_entry_point(tmp_path):
    target = tmp_path / "corpus"
    done = subprocess.run([sys.executable, "tests/helpers/bad_corpus.py", str(target)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith(f"{len(lines) - 1} items written to {target}")
    assert (target / "bomb.png").stat().st_size < 200 and (target / "good.png").is_file()
    again = subprocess.run([sys.executable, "tests/helpers/bad_corpus.py", str(target)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "not empty" in again.stderr
