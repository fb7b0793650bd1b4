"""Bad inputs and usage errors of `nucleibatch segment` (the output contract: tables, exit status).

A folder mixes 3 good synthetic images with files that cannot be segmented (empty,
truncated PNG and TIFF, text named .tif, 1x1 image, 5-D array without axes metadata,
bool and complex pixels). The run must finish with exit status 3, give every input one
row in the images table, the bad ones 'failed' with a specific one-line reason and no
labels, the good ones 'ok' with labels and nuclei; a re-run leaves failed images alone
unless --retry-failed. (Every other kind of bad input, run once: tests/test_bad_corpus.py.) Usage errors exit 2 with one line on stderr. Real files, the real
CLI (in-process ``main`` and ``python -m nucleibatch`` subprocesses), nothing mocked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import zarr

from nucleibatch.cli import main
from nucleibatch.output.folder import MASKS, OutputFolder, label_path
from nucleibatch.synthetic import synthetic_nuclei
from tests.helpers import input_files as files
from tests.helpers.bad_corpus import truncated
from tests.helpers.outputs import image_groups
from tests.helpers.paths import REPO

GOOD = ("good0", "good1", "good2")
# image_id -> words its error must contain (one kind of bad input each)
BAD = {
    "empty": ["empty"],
    "halfpng": ["truncated"],  # PNG cut in half: the header is fine, decoding fails
    "halftiff": ["cannot read"],  # tiled zlib TIFF cut to a third: its tiles fail to decode
    "text": ["not a readable TIFF"],  # a text file named .tif
    "dot": ["1x1", "8x8"],  # too small to segment
    "fived": ["(2, 3, 2, 16, 16)", "unknown meaning"],  # 5-D, no axes metadata
    "mask": ["bool", "not supported"],
    "complex": ["complex64", "not supported"],
}


def write_inputs(folder: Path) -> None:
    folder.mkdir(parents=True)
    for number, name in enumerate(GOOD):
        image, _ = synthetic_nuclei((160, 200), n_nuclei=15, seed=50 + number)
        files.write_plain(folder / f"{name}.png", image)
    (folder / "empty.png").write_bytes(b"")
    files.write_plain(folder / "whole.png", files.grey((128, 128), 40))
    (folder / "halfpng.png").write_bytes(truncated((folder / "whole.png").read_bytes(), 0.5))
    (folder / "whole.png").unlink()
    tifffile.imwrite(folder / "whole.tif", files.grey((256, 256), 41), tile=(64, 64), compression="zlib")
    (folder / "halftiff.tif").write_bytes(truncated((folder / "whole.tif").read_bytes(), 1 / 3))
    (folder / "whole.tif").unlink()
    (folder / "text.tif").write_text("this is not a TIFF\n")
    files.write_plain(folder / "dot.png", np.zeros((1, 1), np.uint8))
    tifffile.imwrite(folder / "fived.tif", np.zeros((2, 3, 2, 16, 16), np.uint8))  # tifffile's shape-only metadata: axes QQQYX
    tifffile.imwrite(folder / "mask.tif", np.zeros((32, 32), bool))
    tifffile.imwrite(folder / "complex.tif", np.zeros((32, 32), np.complex64))


def record_stamps(out: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in OutputFolder(out).records.glob("*.json")}


def test_bad_inputs_fail_alone_with_specific_reasons(tmp_path, tiny_bundle):
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_inputs(inputs)
    argv = ["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle)]
    assert main(argv) == 3

    images = pd.read_parquet(OutputFolder(out).images)
    assert sorted(images["image_id"]) == sorted([*GOOD, *BAD]), "one row per input, whatever happened to it"
    rows = images.set_index("image_id")
    nuclei = pd.read_parquet(OutputFolder(out).nuclei)
    root = zarr.open_group(str(OutputFolder(out).masks), mode="r")
    for image_id, words in BAD.items():
        row = rows.loc[image_id]
        assert row["status"] == "failed", image_id
        error = row["error"]
        assert isinstance(error, str) and error and "\n" not in error and len(error) <= 500, (image_id, error)
        for word in words:
            assert word in error, f"{image_id}: {word!r} not in {error!r}"
        assert row["n_nuclei"] == 0 and pd.isna(row["store_path"]), image_id
        assert image_id not in root, f"{image_id} failed but has a group in {MASKS}"
        assert not (nuclei["image_id"] == image_id).any()
    assert sorted(image_groups(root)) == sorted(GOOD), f"{MASKS} holds only the good images"
    for image_id in GOOD:
        row = rows.loc[image_id]
        assert row["status"] == "ok" and pd.isna(row["error"]) and (row["height"], row["width"]) == (160, 200)
        labels = root[label_path(0, row['store_path'])][...]
        assert labels.shape == (160, 200) and labels.dtype == np.uint32
        ids = set(np.unique(labels[labels > 0]).tolist())
        table = nuclei[nuclei["image_id"] == image_id]
        assert len(table) == row["n_nuclei"] > 0 and set(table["label"].tolist()) == ids
    summary = json.loads(OutputFolder(out).run_json.read_text())["counts"]
    assert (summary["images"], summary["ok"], summary["failed"]) == (len(GOOD) + len(BAD), len(GOOD), len(BAD))

    # a re-run redoes nothing: failed images stay failed without being tried again
    before, run_before = record_stamps(out), OutputFolder(out).run_json.read_bytes()
    assert main(argv) == 3
    assert record_stamps(out) == before
    assert OutputFolder(out).run_json.read_bytes() == run_before, "a run that did nothing keeps the figures of the run that did the work"
    pd.testing.assert_frame_equal(pd.read_parquet(OutputFolder(out).images), images)

    # --retry-failed tries exactly the failed ones again (and they fail the same way)
    assert main([*argv, "--retry-failed"]) == 3
    after = record_stamps(out)
    assert sorted(name for name in after if after[name] != before[name]) == sorted(BAD)
    assert json.loads(OutputFolder(out).run_json.read_text())["counts"]["resumed"] == len(GOOD)
    again = pd.read_parquet(OutputFolder(out).images)
    pd.testing.assert_frame_equal(again.drop(columns="seconds"), images.drop(columns="seconds"))
    assert sorted(image_groups(zarr.open_group(str(OutputFolder(out).masks), mode="r"))) == sorted(GOOD)


# --------------------------------------------------------------------------- usage errors


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nucleibatch", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def only_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    image, _ = synthetic_nuclei((96, 128), n_nuclei=8, seed=3)
    files.write_plain(folder / "a.png", image)
    return folder


@pytest.mark.parametrize(
    "case, extra, words",
    [
        pytest.param("block size not a multiple of 32", ["--block-size", "100"], ["--block-size", "multiple of 32", "100"], id="block-size-100"),
        pytest.param("unknown option", ["--no-such-option"], ["unrecognized arguments", "--no-such-option"], id="unknown-option"),
        pytest.param("unknown place for the instances", ["--instances-on", "gpu"], ["--instances-on", "invalid choice", "gpu"], id="instances-on-gpu"),
        pytest.param("negative post-processing processes", ["--post-workers", "-1"], ["--post-workers", ">= 0", "-1"], id="post-workers-negative"),
        pytest.param(
            "cuda on a CPU machine",
            ["--device", "cuda"],
            ["--device cuda", "no CUDA GPU", "--device cpu"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: --device cuda is valid here"),
            id="device-cuda-without-gpu",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(case, extra, words, good_folder, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    done = run_cli("segment", str(good_folder), "-o", str(out), "--model", str(tiny_bundle), *extra)
    assert done.returncode == 2, (case, done.stderr)
    line = only_line(done.stderr)
    for word in words:
        assert word in line, f"{case}: {word!r} not in {line!r}"
    assert not OutputFolder(out).images.exists() and not OutputFolder(out).lock.exists()


def test_missing_input_exits_2_and_leaves_out_usable(good_folder, tiny_bundle, tmp_path):
    out, missing = tmp_path / "out", tmp_path / "no-such-folder"
    done = run_cli("segment", str(missing), "-o", str(out), "--model", str(tiny_bundle), "--block-size", "512")
    assert done.returncode == 2, done.stderr
    line = only_line(done.stderr)
    assert str(missing) in line and "no such file or folder" in line
    assert not OutputFolder(out).images.exists() and not OutputFolder(out).settings.exists()
    # the corrected command, with other settings, is not refused: OUT holds no results yet
    assert main(["segment", str(good_folder), "-o", str(out), "--model", str(tiny_bundle)]) == 0


def test_missing_model_folder_stops_the_run_with_a_clear_message(good_folder, tmp_path):
    out, bundle = tmp_path / "out", tmp_path / "no-such-bundle"
    done = run_cli("segment", str(good_folder), "-o", str(out), "--model", str(bundle))
    # --model names no bundle: a usage error, exit status 2
    assert done.returncode == 2, done.stderr
    line = only_line(done.stderr)
    assert str(bundle) in line and "config.json" in line and "--model default" in line
    assert not OutputFolder(out).images.exists() and not OutputFolder(out).lock.exists()
