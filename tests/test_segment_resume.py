"""Resume of `nucleibatch segment`: SIGKILL at any moment, then re-run.

Contract under test: re-running the same command on the same OUT skips finished images
and redoes unfinished ones, with no duplicate rows; ``--overwrite`` starts over; a run
killed with SIGKILL at any moment and then re-run ends with the same labels and tables
as an uninterrupted run. Plus: a finished OUT is not redone, a deleted completion record
redoes exactly that image, other settings on the same OUT are refused (exit 2), a live
run's lock refuses a second run (exit 1) and a dead run's lock is taken over.

Everything is real: `python -m nucleibatch segment` subprocesses killed with SIGKILL,
real files, parquet and zarr. Kill points are drawn with a fixed seed from the wall
time of the uninterrupted reference run (``NB_KILL_POINTS=N`` draws N of them; 2 by
default), plus one triggered by the run's own progress: right after its last
completion record, i.e. while it writes the images table and the run summary and exits.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from nucleibatch.cli import main
from nucleibatch.output.folder import LABELS, MASKS, OutputFolder, label_path
from nucleibatch.synthetic import synthetic_nuclei
from tests.helpers import input_files as files
from tests.helpers.outputs import image_groups
from tests.helpers.paths import REPO
from tests.helpers.processes import child_environment

BLOCK = ["--block-size", "256", "--block-margin", "64"]
KILL_SEED = 20240611
N_RANDOM_KILLS = int(os.environ.get("NB_KILL_POINTS", "2"))  # tests/test_faults.py kills one run 20+ times
# small fields (one block each) and two larger images processed in several blocks, placed among
# the small ones in id order (images are done in id order); field08 is taller than 1024 px, so
# its labels have a pyramid level 1 as well
N_IMAGES = 12
LARGE = {3: (600, 700), 8: (1060, 300)}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """12 synthetic images: PNG and TIFF fields of 128..256 px, two tiled TIFFs of several blocks."""
    folder = tmp_path_factory.mktemp("resume") / "in"
    rng = np.random.default_rng(7)
    for i in range(N_IMAGES):
        if i in LARGE:
            image, _ = synthetic_nuclei(LARGE[i], n_nuclei=150, seed=100 + i)
            files.write_tiff(folder / f"field{i:02d}.tif", image, tile=(128, 128), compression="zlib")
            continue
        height, width = (int(v) for v in rng.integers(128, 257, size=2))
        image, _ = synthetic_nuclei((height, width), n_nuclei=12, seed=i)
        if i % 2:
            files.write_plain(folder / f"field{i:02d}.png", image)
        else:
            files.write_tiff(folder / f"field{i:02d}.tif", image)
    return folder


def segment_command(inputs: Path, out: Path, bundle: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nucleibatch", "segment", str(inputs), "-o", str(out), "--model", str(bundle), *BLOCK, *extra]


def run_to_end(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=child_environment(), capture_output=True, text=True, timeout=timeout)


@dataclass
class Reference:
    out: Path
    wall: float  # seconds from start to exit
    first_record: float  # seconds from start to the first completion record (start-up, model load before)


@pytest.fixture(scope="module")
def reference(inputs, tiny_bundle, tmp_path_factory) -> Reference:
    """The uninterrupted run (subprocess): its OUT, wall time, and when it finished its first image."""
    out = tmp_path_factory.mktemp("reference") / "out"
    records = OutputFolder(out).records
    started = time.perf_counter()
    first_record = None
    with open(out.parent / "reference.log", "w") as log:
        proc = subprocess.Popen(segment_command(inputs, out, tiny_bundle), cwd=REPO, env=child_environment(), stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if first_record is None and records.is_dir() and any(records.glob("*.json")):
                first_record = time.perf_counter() - started
            time.sleep(0.005)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, (out.parent / "reference.log").read_text()[-3000:]
    assert first_record is not None, "no completion record seen while the reference ran"
    images = pd.read_parquet(OutputFolder(out).images)
    assert len(images) == N_IMAGES and (images["status"] == "ok").all()
    assert (images["n_nuclei"] > 0).all(), "the reference must have nuclei in every image to compare"
    levels = zarr.open_group(str(OutputFolder(out).masks), mode="r")
    assert "1" in levels[f"{images.set_index('image_id').loc['field08', 'store_path']}/{LABELS}"], "field08 should have a pyramid level"
    return Reference(out, wall, first_record)


def copy_of(reference_out: Path, tmp_path: Path) -> Path:
    """A copy of the finished reference OUT (mtimes kept) to resume on."""
    out = tmp_path / "out"
    shutil.copytree(reference_out, out, symlinks=True)
    return out


# --------------------------------------------------------------------------- checks


def temporary_files(out: Path) -> list[str]:
    """A killed writer's leftovers: nucleibatch's hidden ``.<name>.tmp-<pid>`` and zarr's ``<name>.<uuid>.partial``."""
    found = [*out.rglob(".*.tmp-*"), *OutputFolder(out).masks.rglob("*.partial")]
    return sorted(str(p.relative_to(out)) for p in found)


def part_stamps(out: Path) -> dict[str, tuple[int, int]]:
    """``{part file name: (inode, mtime_ns)}`` of the nuclei table's parts (changes when a part is rewritten)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(OutputFolder(out).nuclei.glob("*.parquet"))}


def record_names(out: Path) -> set[str]:
    return {p.stem for p in OutputFolder(out).records.glob("*.json")}


def run_json(out: Path) -> dict:
    return json.loads(OutputFolder(out).run_json.read_text())


def label_levels(group: zarr.Group) -> list[str]:
    datasets = group[LABELS].attrs["ome"]["multiscales"][0]["datasets"]
    return [d["path"] for d in datasets]


def assert_resumed_out_equals_reference(out: Path, reference_out: Path) -> None:
    """Tables and masks of ``out`` equal the reference's (except timings); nothing duplicated or left over."""
    ref_images = pd.read_parquet(OutputFolder(reference_out).images)
    images = pd.read_parquet(OutputFolder(out).images)
    assert len(images) == N_IMAGES and images["image_id"].is_unique, images["image_id"].tolist()
    pd.testing.assert_frame_equal(
        images.drop(columns="seconds").sort_values("image_id").reset_index(drop=True),
        ref_images.drop(columns="seconds").sort_values("image_id").reset_index(drop=True),
        check_exact=True,
    )

    ref_nuclei = pd.read_parquet(OutputFolder(reference_out).nuclei)
    nuclei = pd.read_parquet(OutputFolder(out).nuclei)
    duplicated = nuclei[nuclei.duplicated(["image_id", "label"], keep=False)]
    assert duplicated.empty, f"duplicate (image_id, label) rows:\n{duplicated.head()}"
    assert sorted(part_stamps(out)) == sorted(part_stamps(reference_out)), "nuclei parts differ from the reference's"
    key = ["image_id", "label"]
    pd.testing.assert_frame_equal(
        nuclei.sort_values(key).reset_index(drop=True), ref_nuclei.sort_values(key).reset_index(drop=True), check_exact=True
    )

    ref_root = zarr.open_group(str(OutputFolder(reference_out).masks), mode="r")
    root = zarr.open_group(str(OutputFolder(out).masks), mode="r")
    assert sorted(image_groups(root)) == sorted(image_groups(ref_root)), f"{MASKS} holds other image groups than the reference"
    for store_path in ref_images["store_path"]:
        group, ref_group = root[store_path], ref_root[store_path]
        assert label_levels(group) == label_levels(ref_group)
        for level in label_levels(ref_group):
            labels, expected = group[label_path(level)], ref_group[label_path(level)]
            assert labels.dtype == expected.dtype and labels.shape == expected.shape
            assert np.array_equal(labels[...], expected[...]), f"{store_path} labels level {level} differ from the reference"
        assert np.array_equal(group["0"][...], ref_group["0"][...]), f"{store_path}: stored image differs"

    # a kill inside an atomic write leaves a temporary file: the re-run must have removed it
    leftovers = temporary_files(out)
    assert leftovers == [], f"temporary files left in OUT: {leftovers}"
    assert not lock_is_held(OutputFolder(out).lock), "a finished run still holds its lock"
    counts = run_json(out)["counts"]
    assert (counts["images"], counts["ok"], counts["failed"]) == (N_IMAGES, N_IMAGES, 0)
    assert counts["nuclei"] == len(ref_nuclei)


# --------------------------------------------------------------------------- kill and resume


def kill_delays(first_record: float, wall: float, n: int = N_RANDOM_KILLS, seed: int = KILL_SEED) -> list[float]:
    """``n`` delays spread over the reference run's work: one uniform draw in each of ``n``
    equal slices of ``[0.8 * first_record, 0.9 * wall]`` (seconds from start).

    ``first_record`` is when the reference finished its first image: before that, python
    and torch start and the model loads (the first slice still lands there, with images in
    flight). Not up to 100 % of ``wall``: a run can be a little faster than the reference
    and exit before the kill; the end phase has its own kill point.
    """
    rng = random.Random(seed)
    lo, hi = 0.8 * first_record, 0.9 * wall
    width = (hi - lo) / n
    return [round(lo + width * (k + rng.random()), 3) for k in range(n)]


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL ``proc``; True when it was still running (False: it had already exited)."""
    still_running = proc.poll() is None
    if still_running:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return still_running


def kill_after(proc: subprocess.Popen, delay: float) -> bool:
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        pass
    return kill(proc)


def kill_after_last_record(proc: subprocess.Popen, out: Path, timeout: float = 300) -> bool:
    """Kill as soon as every image has its completion record: the end phase (tables, run summary, exit)."""
    records = OutputFolder(out).records
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if records.is_dir() and sum(1 for _ in records.glob("*.json")) >= N_IMAGES:
            break
        time.sleep(0.002)
    return kill(proc)


def kill_points() -> list[str]:
    return [f"random-{k}" for k in range(N_RANDOM_KILLS)] + ["after-last-record"]


@pytest.mark.slow
@pytest.mark.parametrize("point", kill_points())
def test_sigkill_at_any_moment_then_rerun_equals_uninterrupted_run(point, inputs, tiny_bundle, reference, tmp_path):
    reference_out, wall = reference.out, reference.wall
    out = tmp_path / "out"
    command = segment_command(inputs, out, tiny_bundle)
    with open(tmp_path / "killed.log", "w") as log_handle:
        proc = subprocess.Popen(command, cwd=REPO, env=child_environment(), stdout=log_handle, stderr=subprocess.STDOUT)
        if point == "after-last-record":
            was_running = kill_after_last_record(proc, out)
            when = "after the last completion record"
        else:
            delay = kill_delays(reference.first_record, wall)[int(point.split("-")[1])]
            was_running = kill_after(proc, delay)
            when = f"{delay:.2f} s after start (reference run: first image done at {reference.first_record:.1f} s, exit at {wall:.1f} s)"
    log = (tmp_path / "killed.log").read_text()
    # what the killed run left: finished images (records), their parts, and maybe its lock
    done_before = record_names(out) if out.exists() else set()
    stamps_before = {name: stamp for name, stamp in part_stamps(out).items() if Path(name).stem in done_before} if out.exists() else {}
    lock = OutputFolder(out).lock
    assert not lock_is_held(lock), "the killed run's lock is still held: the OS must release it"
    print(f"{point}: killed {when}; running: {was_running}; finished images: {len(done_before)}/{N_IMAGES}")
    assert was_running or "segmented" in log, f"the run exited by itself before the kill with status {proc.returncode}:\n{log[-2000:]}"

    rerun = run_to_end(command)
    assert rerun.returncode == 0, f"re-run after a kill {when} failed:\n{rerun.stderr[-3000:]}"
    assert_resumed_out_equals_reference(out, reference_out)
    # finished images were skipped, not redone: same count, same part files
    if len(done_before) < N_IMAGES:
        assert f"{len(done_before)} done by an earlier run" in rerun.stdout, rerun.stdout
    else:  # nothing left to do: the run summary keeps the killed run's figures where it had written them
        assert "nothing to do" in rerun.stdout or f"{N_IMAGES} done by an earlier run" in rerun.stdout, rerun.stdout
    assert {name: stamp for name, stamp in part_stamps(out).items() if name in stamps_before} == stamps_before


def test_kill_delays_are_spread_over_the_run():
    delays = kill_delays(5.0, 20.0, n=5)  # slices of 2.8 s over [4, 18]
    assert delays == sorted(delays) and len(set(delays)) == 5
    assert 4.0 <= delays[0] < 6.8 and 15.2 <= delays[-1] <= 18.0
    assert delays == kill_delays(5.0, 20.0, n=5), "kill points must be reproducible (fixed seed)"


# --------------------------------------------------------------------------- resume rules


def test_rerun_of_a_finished_out_does_no_work(inputs, tiny_bundle, reference, tmp_path, capsys):
    out = copy_of(reference.out, tmp_path)
    before = part_stamps(out)
    records_before = {p.name: p.stat().st_mtime_ns for p in OutputFolder(out).records.glob("*.json")}
    run_before = OutputFolder(out).run_json.read_bytes()
    assert main(["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), *BLOCK]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert OutputFolder(out).run_json.read_bytes() == run_before, "the run that did the work keeps its figures"
    assert part_stamps(out) == before, "a finished image's nuclei part was rewritten"
    assert {p.name: p.stat().st_mtime_ns for p in OutputFolder(out).records.glob("*.json")} == records_before
    assert_resumed_out_equals_reference(out, reference.out)


def test_an_out_from_before_a_setting_existed_resumes_and_a_changed_setting_is_refused(inputs, tiny_bundle, reference, tmp_path):
    """OUT's recorded settings predate --instances-on (a setting added later; the older code made
    instances on the CPU) and hold --context (a setting retired since): the same command on this
    CPU, and --instances-on cpu, resume it; --instances-on device is refused."""
    out = copy_of(reference.out, tmp_path)
    recorded = json.loads(OutputFolder(out).settings.read_text())
    del recorded["settings"]["instances_on"]
    recorded["settings"]["context"] = 64
    OutputFolder(out).settings.write_text(json.dumps(recorded))
    before = part_stamps(out)
    assert main(["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), *BLOCK]) == 0
    assert part_stamps(out) == before
    assert main(["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), *BLOCK, "--instances-on", "cpu"]) == 0
    done = run_to_end(segment_command(inputs, out, tiny_bundle, "--instances-on", "device"))
    assert done.returncode == 2 and "instances_on: cpu -> device" in done.stderr, done.stderr[-2000:]
    assert part_stamps(out) == before


def test_overwrite_starts_over(inputs, tiny_bundle, reference, tmp_path):
    out = copy_of(reference.out, tmp_path)
    # results of an image that is not among the inputs any more: --overwrite must drop them
    root = zarr.open_group(str(OutputFolder(out).masks), mode="a")
    root.create_group("ghost")
    shutil.copy(OutputFolder(out).nuclei_part("field03"), OutputFolder(out).nuclei_part("ghost"))
    ghost = json.loads(OutputFolder(out).record("field03").read_text()) | {"image_id": "ghost", "store_path": "ghost"}
    OutputFolder(out).record("ghost").write_text(json.dumps(ghost))
    before = part_stamps(out)
    (out / "notes.txt").write_text("a user's file in OUT is kept\n")

    assert main(["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), *BLOCK, "--overwrite"]) == 0
    assert run_json(out)["counts"]["resumed"] == 0
    after = part_stamps(out)
    assert all(after[name] != before[name] for name in after), "--overwrite kept a nuclei part of the previous run"
    assert_resumed_out_equals_reference(out, reference.out)  # also: no ghost group, part, or row
    assert (out / "notes.txt").exists()


def test_deleted_completion_record_redoes_exactly_that_image(inputs, tiny_bundle, reference, tmp_path):
    out = copy_of(reference.out, tmp_path)
    before = part_stamps(out)
    OutputFolder(out).record("field03").unlink()
    assert main(["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), *BLOCK]) == 0
    assert run_json(out)["counts"]["resumed"] == N_IMAGES - 1
    after = part_stamps(out)
    changed = sorted(name for name in after if after[name] != before[name])
    assert changed == [OutputFolder(out).nuclei_part("field03").name]
    assert run_json(out)["processed_megapixels"] == pytest.approx(LARGE[3][0] * LARGE[3][1] / 1e6, abs=1e-4)
    assert_resumed_out_equals_reference(out, reference.out)


def test_other_settings_on_the_same_out_are_refused(inputs, tiny_bundle, reference, tmp_path):
    out = copy_of(reference.out, tmp_path)
    before = part_stamps(out)
    command = segment_command(inputs, out, tiny_bundle)
    command[command.index("256")] = "512"  # --block-size 512
    done = run_to_end(command)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "--overwrite" in lines[0] and str(out) in lines[0], lines[0]
    assert part_stamps(out) == before and not lock_is_held(OutputFolder(out).lock)
    assert_resumed_out_equals_reference(out, reference.out)
    assert "block_size: 256 -> 512" in lines[0], lines[0]  # the message names what changed


def test_live_lock_refuses_a_second_run_and_a_dead_ones_is_taken_over(inputs, tiny_bundle, reference, tmp_path, capsys):
    out = copy_of(reference.out, tmp_path)
    lock = OutputFolder(out).lock
    argv = ["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), *BLOCK]
    # another process holds the run lock (as a live run does: an flock on OutputFolder(out).lock)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = part_stamps(out)
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "another run" in err and f"pid {holder.pid}" in err and str(out) in err
        assert part_stamps(out) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL): the OS released its lock, the next run goes ahead
    assert main(argv) == 0
    assert not lock_is_held(lock)
    assert "nothing to do" in capsys.readouterr().out


HOLD_LOCK = """
import fcntl, os, socket, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.truncate(0)
handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
handle.flush()
print("held", flush=True)
time.sleep(120)
"""


def lock_is_held(path) -> bool:
    """True when some process holds the flock on ``path``."""
    import fcntl

    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def test_leftover_temporary_files_of_a_killed_writer_are_removed(inputs, tiny_bundle, reference, tmp_path):
    """A SIGKILL inside an atomic write leaves ``.<name>.tmp-<pid>``; the next run must clean it up.

    Random kill points rarely land inside the few milliseconds of a write, so the state
    they leave is made here directly: the files a writer killed mid-write leaves behind.
    """
    out = copy_of(reference.out, tmp_path)
    OutputFolder(out).record("field03").unlink()  # field03 was being finished when the run was killed
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = OutputFolder(out)
    leftovers = [
        path.parent / f".{path.name}.tmp-{dead.pid}"
        for path in (folder.nuclei_part("field03"), folder.record("field03"), folder.images, folder.run_json)
    ]
    for path in leftovers:
        path.write_bytes(b"PAR1 half written")
    assert main(["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), *BLOCK]) == 0
    assert temporary_files(out) == []  # a dead writer's temporary files are removed at the next run
    assert_resumed_out_equals_reference(out, reference.out)


def test_images_running_at_once_open_the_masks_root_safely(tmp_path):
    """The local engine segments 2 images at once and each opens OUT's masks store.

    ``open_root`` (``zarr.open_group(mode="a")``) checks for the group, then creates it: two
    threads creating a fresh root race, and the loser gets ``ContainsGroupError`` (its image
    'failed'; seen in 1 of 2 fresh runs before run_segment_job created the root once, up
    front). This guards that design: after one ``open_root`` (what run_segment_job does
    before starting the engine), concurrent opens must all succeed.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from nucleibatch.output.store import open_root

    errors = []
    for trial in range(200):  # unguarded, the race is lost in ~5 % of tries: 200 tries would find it
        path = OutputFolder(tmp_path / f"out{trial}").masks
        open_root(path)  # as run_segment_job does, once
        barrier = threading.Barrier(2)

        def open_it(path=path, barrier=barrier):
            barrier.wait()
            return open_root(path)

        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(open_it) for _ in range(2)]:
                try:
                    future.result()
                except Exception as error:  # noqa: BLE001 (collected and reported below)
                    errors.append(f"{type(error).__name__}: {error}")
    assert errors == [], f"{len(errors)} of 400 concurrent opens of {MASKS} failed, e.g. {errors[0]}"


def test_fresh_out_root_exists_before_images_run(inputs, tiny_bundle, tmp_path):
    """A run whose every image fails still creates the masks store up front (the root is made once, by the job)."""
    out = tmp_path / "out"
    # --channel 5: every (grey) input is refused at discovery, so no image ever opens the root itself
    assert main(["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), *BLOCK, "--channel", "5"]) == 3
    root = zarr.open_group(str(OutputFolder(out).masks), mode="r")
    assert list(root.group_keys()) == []
    images = pd.read_parquet(OutputFolder(out).images)
    assert len(images) == N_IMAGES and (images["status"] == "failed").all()
    assert images["error"].str.contains("--channel 5").all()
    assert pd.read_parquet(OutputFolder(out).nuclei).empty
