"""Fault injection on `nucleibatch segment` (issue 5): kills at many points, a full disk, damaged
and changed files. Whatever happens, the final outputs equal those of an uninterrupted run.

* Kill chain: one OUT, ~30 images, the segment process SIGKILLed again and again (>= 20 kills):
  at random moments while images are processed (triggered by its own progress), and at named
  fail points (:mod:`nucleibatch.runtime.faults`): creating a store group, writing a pyramid level, a
  nuclei part, a completion record, between a temporary file and its rename, consolidating
  the images and nuclei tables, writing the run summary and the report. After each kill the same
  command is run again; the last run goes to the end.
* Full disk: a tmpfs of a few MB (or, where this machine cannot mount one, the ``enospc`` fail
  point on every write) fills mid-run: exit status 1 with a clear message, finished images
  intact (verify), and the re-run after space is freed completes.
* Damage and change: ``nucleibatch verify`` finds deleted / truncated chunks and a deleted nuclei
  part, ``segment --verify`` redoes exactly those images; an input rewritten after it was
  processed is redone on resume, the others are not.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nucleibatch.cli import main
from nucleibatch.output.folder import IMAGES, REPORT, RUN, OutputFolder, label_path
from nucleibatch.output.folder import SETTINGS as SETTINGS_FILE
from nucleibatch.segment.job import run_segment_job
from nucleibatch.segment.settings import SegmentSettings
from nucleibatch.synthetic import synthetic_nuclei
from nucleibatch.verify import verify_output
from tests.helpers import input_files as files
from tests.helpers.outputs import assert_same_masks_and_tables
from tests.helpers.paths import REPO
from tests.helpers.processes import child_environment

SETTINGS = SegmentSettings(block_size=256, block_margin=64)
BLOCK_ARGS = ["--block-size", "256", "--block-margin", "64"]
N_SMALL = 27
LARGE = {"large_a": (600, 700), "large_b": (1060, 300)}  # several blocks; large_b has a pyramid level 1
SEED = 5


@pytest.fixture(scope="module")
def fault_inputs(tmp_path_factory) -> Path:
    """30 inputs: 27 small fields (PNG, TIFF), 2 multi-block tiled TIFFs, 1 text file named .tif."""
    folder = tmp_path_factory.mktemp("faults") / "in"
    rng = np.random.default_rng(SEED)
    for i in range(N_SMALL):
        height, width = (int(v) for v in rng.integers(96, 200, size=2))
        image, _ = synthetic_nuclei((height, width), n_nuclei=8, seed=200 + i)
        (files.write_plain if i % 2 else files.write_tiff)(folder / f"field{i:02d}{'.png' if i % 2 else '.tif'}", image)
    for k, (name, shape) in enumerate(LARGE.items()):
        image, _ = synthetic_nuclei(shape, n_nuclei=120, seed=300 + k)
        files.write_tiff(folder / f"{name}.tif", image, tile=(128, 128), compression="zlib")
    (folder / "broken.tif").write_text("not a TIFF\n")
    return folder


@pytest.fixture(scope="module")
def uninterrupted_out(fault_inputs, tiny_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults-uninterrupted_out") / "out"
    summary = run_segment_job([str(fault_inputs)], out, model=str(tiny_bundle), settings=SETTINGS, progress=False)
    assert summary.n_images == N_SMALL + len(LARGE) + 1 and summary.n_failed == 1 and summary.n_nuclei > 100
    return out


def command(fault_inputs: Path, out: Path, bundle: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nucleibatch", "segment", str(fault_inputs), "-o", str(out), "--model", str(bundle), *BLOCK_ARGS, *extra]


def records(out: Path) -> int:
    folder = OutputFolder(out).records
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def run_killed(cmd: list[str], out: Path, rng: random.Random, log: Path, fail_at: str | None = None) -> tuple[int, str]:
    """Run ``cmd`` with the fail point ``fail_at`` armed; with none, SIGKILL it a random 0-0.05 s
    after it has finished 1-2 more images. Returns its exit status (-9 when killed) and how it
    ended: the fail point's name, "random", or "finished"."""
    before, wanted = records(out), (N_IMAGES + 1 if fail_at else rng.randint(1, 2))
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_environment(fail_at), stdout=handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while proc.poll() is None and records(out) < before + wanted and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))  # short: an image takes ~0.1 s, and every kill should land mid-run
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        status = proc.wait(timeout=60)
    if "fail point" in log.read_text():
        return status, str(fail_at)
    return status, "random" if status == -signal.SIGKILL else "finished"


# While images are processed: random moments, and fail points of the image phase. Once every
# image is done, the end phase: consolidation, run summary, report (each kill point is passed
# only by a run that gets that far, so they come last, in the order the run passes them).
IMAGE_PHASE = [
    f"rename:{SETTINGS_FILE}:1", None, "store:group:2", None, "part:1", None, "record:2", None,
    "store:group:3", None, "part:2", None, "record:1", None, "store:pyramid:1",
]  # fmt: skip
END_PHASE = [
    "consolidate:1", f"write:{IMAGES}:1", f"rename:{IMAGES}:1", f"write:{RUN}:1",
    f"rename:{RUN}:1", f"write:{REPORT}:1", f"rename:{REPORT}:1",
]  # fmt: skip
N_IMAGES = N_SMALL + len(LARGE) + 1


@pytest.mark.slow
def test_killed_twenty_times_at_random_moments_and_fail_points_loses_nothing(fault_inputs, tiny_bundle, uninterrupted_out, tmp_path):
    out = tmp_path / "out"
    cmd = command(fault_inputs, out, tiny_bundle)
    rng = random.Random(SEED)
    kills: list[str] = []
    for number, fail_at in enumerate(IMAGE_PHASE + [None] * N_IMAGES):
        if records(out) == N_IMAGES:
            break
        status, how = run_killed(cmd, out, rng, tmp_path / f"run{number}.log", fail_at)
        assert status in (-signal.SIGKILL, 3), f"run {number} ({fail_at}): exit {status}\n{(tmp_path / f'run{number}.log').read_text()[-3000:]}"
        if status == -signal.SIGKILL:
            kills.append(how)
    # the last run of the image phase may have finished, and a rerun with nothing to do keeps its
    # run summary and report: without them, the end phase's runs have both to write (and are
    # killed writing them)
    for name in (RUN, REPORT):
        (out / name).unlink(missing_ok=True)
    for step in END_PHASE:  # each is passed only by a run that gets that far: in the order a run passes them
        status, how = run_killed(cmd, out, rng, tmp_path / f"{step}.log", step)
        assert status == -signal.SIGKILL and how == step, f"{step} was not reached (exit {status})"
        kills.append(step)
    final = subprocess.run(cmd, cwd=REPO, env=child_environment(), capture_output=True, text=True, timeout=300)
    assert final.returncode == 3, final.stderr[-3000:]  # broken.tif stays failed
    print(f"{len(kills)} kills: {kills}")
    assert len(kills) >= 20 and len(set(kills) - {"random"}) >= 12, kills
    images = assert_same_masks_and_tables(uninterrupted_out, out)
    assert images.image_id.is_unique and len(images) == N_IMAGES
    leftovers = [str(p) for p in out.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]
    assert leftovers == []
    report = verify_output(out)
    assert report.intact and report.checked == N_IMAGES - 1
    assert OutputFolder(out).report.stat().st_size > 1000


def _mount_tmpfs(folder: Path, megabytes: float) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.environ.get("NB_TEST_NO_MOUNT"):  # to exercise the fallback where mounting works
        return False
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "tmpfs", str(folder)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_full_disk_stops_the_run_with_status_1_and_the_rerun_completes(fault_inputs, tiny_bundle, uninterrupted_out, tmp_path):
    disk = tmp_path / "small-disk"
    used = sum(p.stat().st_size for p in uninterrupted_out.rglob("*") if p.is_file()) / 2**20
    mounted = _mount_tmpfs(disk, used / 2)
    try:
        out = disk / "out"
        fail_at = None if mounted else "write*:12:enospc"  # no mount here: every write from the 12th on fails
        first = subprocess.run(command(fault_inputs, out, tiny_bundle), cwd=REPO, env=child_environment(fail_at), capture_output=True, text=True, timeout=300)
        assert first.returncode == 1, first.stderr[-3000:]
        last_line = first.stderr.strip().splitlines()[-1]
        assert "stopped" in last_line and "No space left on device" in last_line and "finished work is kept" in last_line, first.stderr[-3000:]
        done = records(out)
        assert 0 < done < N_SMALL + len(LARGE) + 1, f"the disk should fill mid-run ({done} images recorded)"
        report = verify_output(out)
        assert report.intact and report.checked >= done - 1  # broken.tif's record is a failed row, not checked
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True, timeout=30)
        again = subprocess.run(command(fault_inputs, out, tiny_bundle), cwd=REPO, env=child_environment(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 3, again.stderr[-3000:]
        assert f"{done} done by an earlier run" in again.stdout
        assert_same_masks_and_tables(uninterrupted_out, out)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], timeout=30)
    print("full disk:", "tmpfs" if mounted else "enospc fail point")


def test_verify_finds_damage_and_segment_verify_redoes_exactly_the_damaged_images(fault_inputs, tiny_bundle, uninterrupted_out, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted_out, out)
    images = pd.read_parquet(OutputFolder(out).images).set_index("image_id")
    assert main(["verify", str(out)]) == 0
    chunk_of = {i: sorted((OutputFolder(out).masks / images.loc[i, "store_path"] / label_path(0) / "c").rglob("*")) for i in ("field01", "large_a")}
    next(p for p in chunk_of["field01"] if p.is_file()).unlink()  # a deleted label chunk
    truncated = next(p for p in chunk_of["large_a"] if p.is_file())
    truncated.write_bytes(truncated.read_bytes()[:10])  # a truncated one
    OutputFolder(out).nuclei_part(images.loc["field04", "store_path"]).unlink()
    capsys.readouterr()
    assert main(["verify", str(out)]) == 3
    printed = capsys.readouterr().out
    assert "3 damaged" in printed and all(i in printed for i in ("field01", "large_a", "field04")) and "--verify" in printed

    resumed = run_segment_job([str(fault_inputs)], out, model=str(tiny_bundle), settings=SETTINGS, progress=False)
    assert resumed.n_resumed == len(images)  # without --verify a resume trusts finished images
    redone = run_segment_job([str(fault_inputs)], out, model=str(tiny_bundle), settings=SETTINGS, verify=True, progress=False)
    assert redone.n_resumed == len(images) - 3
    assert verify_output(out).intact
    assert_same_masks_and_tables(uninterrupted_out, out)


def test_an_input_changed_since_it_was_processed_is_redone(fault_inputs, tiny_bundle, uninterrupted_out, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(fault_inputs, inputs)
    out = tmp_path / "out"
    first = run_segment_job([str(inputs)], out, model=str(tiny_bundle), settings=SETTINGS, progress=False)
    changed, _ = synthetic_nuclei((150, 170), n_nuclei=3, seed=999)
    files.write_plain(inputs / "field03.png", changed)  # rewritten: another size and mtime
    (inputs / "broken.tif").unlink()
    fixed, _ = synthetic_nuclei((120, 120), n_nuclei=5, seed=998)
    files.write_tiff(inputs / "broken.tif", fixed)  # a failed input, repaired
    second = run_segment_job([str(inputs)], out, model=str(tiny_bundle), settings=SETTINGS, progress=False)
    assert second.n_resumed == first.n_images - 2 and second.n_failed == 0
    fresh = run_segment_job([str(inputs)], tmp_path / "fresh", model=str(tiny_bundle), settings=SETTINGS, progress=False)
    assert fresh.n_nuclei == second.n_nuclei
    assert_same_masks_and_tables(tmp_path / "fresh", out)


@pytest.mark.parametrize("leftover", ["metadata without the group", "chunks without the group"])
def test_recreating_an_image_group_replaces_the_leftovers_of_a_killed_attempt(tmp_path, leftover):
    """A run killed while it created (or deleted) an image group can leave array metadata or
    chunks under the group's path without the group's own zarr.json; the next attempt must
    start from an empty group, not fail on what is there."""
    from nucleibatch.output.store import create_image_group, label_array, open_root

    root = open_root(OutputFolder(tmp_path).masks)
    group = create_image_group(root, "img", "img", (64, 80), 1, np.uint8, chunk=32)
    if leftover == "chunks without the group":
        label_array(group)[:, :] = 7
    (OutputFolder(tmp_path).masks / "img" / "zarr.json").unlink()
    assert "img" not in open_root(OutputFolder(tmp_path).masks)

    again = create_image_group(open_root(OutputFolder(tmp_path).masks), "img", "img", (64, 80), 1, np.uint8, chunk=32)
    assert label_array(again).shape == (64, 80) and not label_array(again)[:, :].any()
    assert not list((OutputFolder(tmp_path).masks / "img").rglob("c"))  # no chunk of the earlier attempt


def test_a_full_disk_while_creating_an_image_group_is_reported_once(tmp_path, monkeypatch, caplog):
    """zarr writes an image group's metadata documents as concurrent tasks and raises the first
    failure; on a full disk the others fail too. Their errors must not be logged afterwards
    ("Task exception was never retrieved"): the run's one-line stop message stays the last word."""
    import errno
    import gc
    import logging

    import zarr.storage._local as local_store

    from nucleibatch.output.store import create_image_group, open_root

    root = open_root(OutputFolder(tmp_path).masks)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_store, "_put", disk_full)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(OSError, match="No space left"):
            create_image_group(root, "img", "img", (64, 80), 1, np.uint8, chunk=32)
        time.sleep(0.5)  # the other writes finish (and fail) on zarr's event loop
        gc.collect()  # their tasks are collected: asyncio would log them now
        time.sleep(0.1)
    assert not [r.getMessage() for r in caplog.records if r.name == "asyncio"]
