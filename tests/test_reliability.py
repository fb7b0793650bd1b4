"""Reliability, round 2 (issue 21): no input stops a run, no stale or duplicated rows, the same
nuclei every time.

Real runs of the CLI on small files (the tiny random-weight bundle where the nuclei do not
matter, the shipped model where they do), real permissions (a process without the capabilities
that let root read any folder), real signals.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from nucleibatch.cli import main
from nucleibatch.output.folder import NUCLEI, OutputFolder, label_path
from nucleibatch.output.store import MAX_STORE_NAME, store_name
from nucleibatch.synthetic import synthetic_nuclei
from nucleibatch.tiling import MIN_WINDOW, small_image_window
from nucleibatch.verify import verify_output
from tests.helpers import input_files as files
from tests.helpers.outputs import image_groups
from tests.helpers.paths import REPO


def nucleus_image(seed: int, shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    image, _ = synthetic_nuclei(shape, n_nuclei=8, seed=seed)
    return image


def cli(*args: str, env: dict | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "nucleibatch", *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def images_table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(OutputFolder(out).images).set_index("image_id")


# --------------------------------------------------------------------------- 1. long names


def test_store_names_are_bounded_unique_and_stable():
    ids = [name * length for name in ("a", "é", "b/c", "x y") for length in range(1, 300, 7)]
    names = [store_name(i) for i in ids]
    assert max(len(n.encode()) for n in names) <= MAX_STORE_NAME
    assert len(set(names)) == len(set(ids)), "one name per id"
    assert store_name("plate/A01 field 1") == "plate__A01_field_1-" + store_name("plate/A01 field 1")[-8:], "names that fitted keep their form"
    assert store_name("a" * MAX_STORE_NAME) == "a" * MAX_STORE_NAME
    # long ids that share their first bytes still get different names
    assert store_name("p" * 400 + "1") != store_name("p" * 400 + "2")


def test_file_names_of_any_legal_length_segment_or_fail_alone(tmp_path, tiny_bundle):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    files.write_plain(inputs / "short.png", nucleus_image(1))
    long_good = "g" * 251 + ".png"  # 255 bytes, the longest name ext4 allows
    long_bad = "b" * 250 + ".tif"  # an empty file: fails at discovery, whose record names it
    files.write_plain(inputs / long_good, nucleus_image(2))
    (inputs / long_bad).write_bytes(b"")
    files.write_plain(inputs / ("m" * 238 + ".png"), nucleus_image(3))  # the 242-byte case of the issue
    argv = ["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), "--post-workers", "0"]
    assert main(argv) == 3
    rows = images_table(out)
    assert len(rows) == 4 and (rows["status"] == "ok").sum() == 3
    assert rows.loc["b" * 250, "status"] == "failed" and "empty" in rows.loc["b" * 250, "error"]
    assert all(len(name) <= MAX_STORE_NAME for name in rows["store_path"].dropna())
    assert OutputFolder(out).run_json.is_file()
    assert main(argv) == 3, "the re-run resumes: the failed image stays failed"
    assert len(images_table(out)) == 4


# --------------------------------------------------------------------------- 2. unlistable folders


def test_a_folder_the_user_cannot_list_is_skipped_with_a_warning(tmp_path, tiny_bundle):
    inputs, out = tmp_path / "in", tmp_path / "out"
    (inputs / "locked").mkdir(parents=True)
    files.write_plain(inputs / "a.png", nucleus_image(4))
    files.write_plain(inputs / "locked" / "b.png", nucleus_image(5))
    (inputs / "locked").chmod(0)
    # without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, root is refused as any user is (CI runs as root)
    prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
    if prefix and shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to run this test as root without the capabilities that bypass permissions")
    try:
        done = cli("segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), "--post-workers", "0", prefix=prefix)
    finally:
        (inputs / "locked").chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert "cannot list" in done.stderr and "locked" in done.stderr
    assert list(images_table(out).index) == ["a"]


# --------------------------------------------------------------------------- 3. narrow images


def test_narrow_images_get_windows_of_at_least_min_window():
    assert small_image_window((400, 24), 1024) == (416, MIN_WINDOW)
    assert small_image_window((16, 600), 1024) == (MIN_WINDOW, 608)
    assert small_image_window((256, 320), 1024) == (256, 320), "wider images keep their window"


@pytest.mark.parametrize("shape", [(400, 24), (600, 16)])
def test_a_narrow_image_gives_the_same_nuclei_on_every_run_on_the_bf16_path(shape, small_dsb_root):
    from PIL import Image

    from nucleibatch.model import load_model
    from nucleibatch.segment.array import segment_image

    field = np.asarray(Image.open(sorted(small_dsb_root.glob("*/images/*.png"))[0]))[..., :3]
    tall = np.concatenate([field] * 3, axis=0)[: shape[0], : shape[1]]
    model = load_model("default", precision="bf16")
    assert model.bf16
    labels = [segment_image(np.ascontiguousarray(tall), model) for _ in range(3)]
    assert labels[0].max() > 0
    for other in labels[1:]:
        np.testing.assert_array_equal(other, labels[0])


# --------------------------------------------------------------------------- 4. OUT inside the input


def test_an_out_inside_the_input_folder_is_not_read_as_input(tmp_path, tiny_bundle):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed in range(3):
        files.write_plain(inputs / f"f{seed}.png", nucleus_image(10 + seed))
    other_out = inputs / "older-results"  # another run's OUT, also inside
    assert main(["segment", str(inputs / "f0.png"), "-o", str(other_out), "--model", str(tiny_bundle), "--post-workers", "0"]) == 0
    for _ in range(3):
        assert main(["segment", str(inputs), "-o", str(inputs / "out"), "--model", str(tiny_bundle), "--post-workers", "0"]) == 0
        assert sorted(images_table(inputs / "out").index) == ["f0", "f1", "f2"]
        assert main(["export", str(inputs / "out"), "--format", "tiff"]) == 0  # OUT/export/tiff/*.tif: not inputs either
    # OUT is the input folder itself: the images beside the outputs are found, the outputs are not
    for _ in range(2):
        assert main(["segment", str(inputs), "-o", str(inputs), "--model", str(tiny_bundle), "--post-workers", "0"]) == 0
        assert sorted(images_table(inputs).index) == ["f0", "f1", "f2"]


# --------------------------------------------------------------------------- 5. stale nuclei, verify


def test_an_image_that_became_unreadable_leaves_no_nuclei_and_verify_reads_the_tables(tmp_path, tiny_bundle):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for seed in range(3):
        files.write_plain(inputs / f"f{seed}.png", nucleus_image(20 + seed, (160, 200)))
    argv = ["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), "--post-workers", "0"]
    assert main(argv) == 0
    assert verify_output(out).intact
    nuclei = pd.read_parquet(OutputFolder(out).nuclei)
    assert (nuclei["image_id"] == "f1").sum() > 0
    (inputs / "f1.png").write_bytes(b"")  # replaced by something that fails at discovery
    time.sleep(0.01)
    assert main(argv) == 3
    assert images_table(out).loc["f1", "status"] == "failed"
    assert (pd.read_parquet(OutputFolder(out).nuclei)["image_id"] == "f1").sum() == 0
    report = verify_output(out)
    assert report.intact, report.lines()

    # verify finds what a table or a part says against the records
    part = OutputFolder(out).nuclei_part
    shutil.copy(part("f0"), part("f1"))  # a part beside a failed image
    table = pd.read_parquet(OutputFolder(out).images)
    table.loc[table["image_id"] == "f2", "n_nuclei"] += 1
    table.to_parquet(OutputFolder(out).images)
    shutil.copy(part("f0"), part("gone"))
    report = verify_output(out)
    assert not report.intact
    assert [d.image_id for d in report.damaged] == ["f1"]
    text = "\n".join(report.lines())
    assert "'f2'" in text and "n_nuclei" in text and part("gone").name in text, text
    done = cli("verify", str(out))
    assert done.returncode == 3
    assert main([*argv, "--verify"]) == 3
    assert verify_output(out).intact
    assert set(pd.read_parquet(OutputFolder(out).nuclei)["image_id"]) == {"f0", "f2"}


def test_verify_into_a_closed_pipe_stops_quietly(tmp_path, tiny_bundle):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    files.write_plain(inputs / "a.png", nucleus_image(30))
    assert main(["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), "--post-workers", "0"]) == 0
    reader = subprocess.Popen([sys.executable, "-m", "nucleibatch", "verify", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()  # as `| head -1` does once it has its line
    stderr = reader.stderr.read().decode()
    reader.wait(timeout=120)
    assert "Broken pipe" not in stderr and "Traceback" not in stderr, stderr


# --------------------------------------------------------------------------- 8, 9. pixel types


def test_64_bit_and_big_endian_tiffs_segment_like_their_16_bit_twin(tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    image = nucleus_image(40, (128, 128)).astype(np.float64)
    counts = np.round(image / image.max() * 1000)
    tifffile.imwrite(inputs / "u16.tif", counts.astype(np.uint16))
    tifffile.imwrite(inputs / "u64.tif", counts.astype(np.uint64))
    tifffile.imwrite(inputs / "i64.tif", counts.astype(np.int64))
    tifffile.imwrite(inputs / "be.tif", counts.astype(">u2"), byteorder=">")
    # variation far below float32's resolution at its level: normalised in float64
    tifffile.imwrite(inputs / "f64.tif", 1e9 + counts / 100)
    assert main(["segment", str(inputs), "-o", str(out), "--model", "default", "--post-workers", "0", "--precision", "float32"]) == 0
    rows = images_table(out)
    assert (rows["status"] == "ok").all(), rows["error"].dropna().to_dict()
    root = zarr.open_group(str(OutputFolder(out).masks), mode="r")
    reference = root[rows.loc["u16", "store_path"]][label_path(0)][:]
    assert reference.max() > 0
    for image_id in ("u64", "i64", "be", "f64"):
        labels = root[rows.loc[image_id, "store_path"]][label_path(0)][:]
        np.testing.assert_array_equal(labels, reference, err_msg=image_id)


# --------------------------------------------------------------------------- 9. signals and small things


def test_usage_errors_exit_2(tmp_path, tiny_bundle):
    inputs = tmp_path / "in"
    inputs.mkdir()
    files.write_plain(inputs / "a.png", nucleus_image(50))
    done = cli("segment", str(inputs), "-o", "", "--model", str(tiny_bundle))
    assert done.returncode == 2 and "-o is empty" in done.stderr, done.stderr
    assert not OutputFolder(Path(REPO)).images.exists()
    missing = tmp_path / "no-such-bundle"
    done = cli("segment", str(inputs), "-o", str(tmp_path / "out"), "--model", str(missing))
    assert done.returncode == 2 and str(missing) in done.stderr and "config.json" in done.stderr, done.stderr


def test_a_live_out_is_refused_before_models_load_or_inputs_are_read(tmp_path, tiny_bundle, monkeypatch):
    from nucleibatch.output.lock import Lock
    from nucleibatch.segment import choose, job

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    files.write_plain(inputs / "a.png", nucleus_image(51))

    def too_early(*args, **kwargs):
        raise AssertionError("loaded models or read inputs before taking the lock")

    monkeypatch.setattr(choose, "load_models", too_early)
    monkeypatch.setattr(job, "discover_inputs", too_early)
    out.mkdir()
    with Lock(out):
        assert main(["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), "--post-workers", "0"]) == 1


def test_sigterm_stops_with_the_stopped_line_and_a_rerun_finishes(tmp_path, tiny_bundle):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for seed in range(12):
        files.write_plain(inputs / f"f{seed:02d}.png", nucleus_image(60 + seed, (256, 256)))
    command = [sys.executable, "-m", "nucleibatch", "segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), "--post-workers", "0", "--batch-size", "1"]
    env = {**os.environ, "NUCLEIBATCH_FAIL_AT": ""}
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    records = OutputFolder(out).records
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (records.is_dir() and any(records.glob("*.json"))) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert "stopped: SIGTERM" in stderr and "re-run" in stderr, stderr
    assert "Traceback" not in stderr
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(images_table(out)) == 12
    assert verify_output(out).intact


def test_a_command_that_stops_in_time_after_sigterm_is_not_exited_later(monkeypatch):
    from nucleibatch import cli

    monkeypatch.setattr(cli, "STOP_GRACE_S", 0.2)
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    with pytest.raises(cli.Terminated), cli.stop_on_sigterm("segment"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal interrupts this
    assert time.monotonic() - started < 4
    assert signal.getsignal(signal.SIGTERM) == before, "the handler before the command is back"
    time.sleep(0.6)  # past the grace period: had its timer not been cancelled, this process would have exited


def test_a_run_killed_during_overwrite_is_finished_by_the_next_run(tmp_path, tiny_bundle):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for seed in range(3):
        files.write_plain(inputs / f"f{seed}.png", nucleus_image(80 + seed, (160, 200)))
    command = ["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), "--post-workers", "0"]
    assert main(command) == 0
    before = pd.read_parquet(OutputFolder(out).nuclei).sort_values(["image_id", "label"]).reset_index(drop=True)
    env = {**os.environ, "NUCLEIBATCH_FAIL_AT": f"clear:{NUCLEI}"}  # killed after the parts went, records still there
    done = cli(*command, "--overwrite", env=env)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not OutputFolder(out).nuclei.exists() and any(OutputFolder(out).records.glob("*.json"))
    assert main(command) == 0  # a plain re-run
    after = pd.read_parquet(OutputFolder(out).nuclei).sort_values(["image_id", "label"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(after, before)
    assert verify_output(out).intact


# --------------------------------------------------------------------------- 6. repaired inputs


def test_inputs_repaired_after_a_run_are_redone_without_retry_failed(tmp_path, tiny_bundle):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    files.write_plain(inputs / "present.png", nucleus_image(90))
    manifest = files.write_manifest_txt(inputs / "list.txt", ["present.png", "later.png"])
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "link.png").symlink_to("target.png")  # dangling for now
    argv = ["segment", str(manifest), str(linked), "-o", str(out), "--model", str(tiny_bundle), "--post-workers", "0"]
    assert main(argv) == 3
    rows = images_table(out)
    assert rows.loc["later", "status"] == "failed" and rows.loc["link", "status"] == "failed"
    files.write_plain(inputs / "later.png", nucleus_image(91))  # the missing file arrives
    files.write_plain(linked / "target.png", nucleus_image(92))  # the link's target appears (found once, as the link)
    assert main(argv) == 0
    rows = images_table(out)
    assert (rows["status"] == "ok").all() and rows.loc[["later", "link"], "n_nuclei"].gt(0).all()
    assert sorted(rows.index) == ["later", "link", "present"]


def test_a_file_changed_after_discovery_is_redone_by_the_next_run(tmp_path, tiny_bundle, monkeypatch):
    from nucleibatch.segment import choose

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    files.write_plain(inputs / "a.png", nucleus_image(93))
    files.write_plain(inputs / "b.png", nucleus_image(94))
    choose_all = choose.choose_all

    def change_b_then_choose(records, *args):
        files.write_plain(inputs / "b.png", nucleus_image(95, (120, 150)))  # rewritten while the run goes on
        return choose_all(records, *args)

    argv = ["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), "--post-workers", "0"]
    monkeypatch.setattr(choose, "choose_all", change_b_then_choose)
    assert main(argv) == 3
    assert images_table(out).loc["b", "status"] == "failed"
    monkeypatch.setattr(choose, "choose_all", choose_all)
    assert main(argv) == 0, "the file changed after the first run discovered it: redone"
    assert images_table(out).loc["b", "height"] == 120


# --------------------------------------------------------------------------- 7. an input root added to an OUT


def test_adding_an_input_beside_the_first_is_refused_rather_than_renaming_images(tmp_path, tiny_bundle):
    r1, r2, out = tmp_path / "r1", tmp_path / "r2", tmp_path / "out"
    for root, seed in ((r1, 100), (r2, 110)):
        root.mkdir()
        for k in range(2):
            files.write_plain(root / f"f{k}.png", nucleus_image(seed + k))
    common = ["-o", str(out), "--model", str(tiny_bundle), "--post-workers", "0"]
    assert main(["segment", str(r2), *common]) == 0
    done = cli("segment", str(r1), str(r2), *common)
    assert done.returncode == 2, done.stderr
    assert "'f0' is now 'r2/f0'" in done.stderr and "--overwrite" in done.stderr
    assert sorted(images_table(out).index) == ["f0", "f1"]
    assert main(["segment", str(r1), str(r2), *common, "--overwrite"]) == 0
    rows = images_table(out)
    assert sorted(rows.index) == ["r1/f0", "r1/f1", "r2/f0", "r2/f1"]
    assert set(pd.read_parquet(OutputFolder(out).nuclei)["image_id"]) == set(rows.index)


# --------------------------------------------------------------------------- 10. block-level resume


def slide_outputs(out: Path) -> tuple[np.ndarray, pd.DataFrame, dict]:
    rows = images_table(out)
    labels = zarr.open_group(str(OutputFolder(out).masks), mode="r")[rows.loc["slide", "store_path"]][label_path(0)][:]
    nuclei = pd.read_parquet(OutputFolder(out).nuclei).sort_values("label").reset_index(drop=True)
    return labels, nuclei, json.loads(OutputFolder(out).run_json.read_text())


def kill_after_blocks(command: list[str], out: Path, blocks: int) -> int:
    """Start ``command``, SIGKILL its process group once ``blocks`` more block checkpoints than now
    exist; returns how many there were at the kill."""
    folder = OutputFolder(out).blocks
    count = lambda: len(list(folder.glob("*/*.npz"))) if folder.is_dir() else 0  # noqa: E731
    target = count() + blocks
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None and count() < target and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it was killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return count()


@pytest.mark.parametrize("post_workers", ["0", "1"], ids=["threads", "processes"])
def test_a_slide_killed_again_and_again_resumes_from_its_finished_blocks(post_workers, tmp_path, tiny_bundle):
    inputs = tmp_path / "in"
    inputs.mkdir()
    image, _ = synthetic_nuclei((1024, 1024), n_nuclei=260, seed=7)
    tifffile.imwrite(inputs / "slide.tif", image, tile=(256, 256))
    options = ["--model", str(tiny_bundle), "--block-size", "256", "--block-margin", "64", "--post-workers", post_workers]
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert main(["segment", str(inputs), "-o", str(reference), *options]) == 0
    reference_labels, reference_nuclei, reference_run = slide_outputs(reference)
    assert reference_run["model_tiles"] >= 16  # 16 blocks

    command = [sys.executable, "-m", "nucleibatch", "segment", str(inputs), "-o", str(out), *options]
    done_at_kills = [kill_after_blocks(command, out, 4), kill_after_blocks(command, out, 4)]
    assert 8 <= done_at_kills[1] < 16 and done_at_kills[1] > done_at_kills[0], "each run went further"
    assert not OutputFolder(out).images.exists()
    assert main(["segment", str(inputs), "-o", str(out), *options]) == 0
    labels, nuclei, run = slide_outputs(out)
    # at least half the blocks were kept (blocks alike in size, the border rows as the middle ones)
    assert run["model_tiles"] <= 0.75 * reference_run["model_tiles"], "the finished blocks were not predicted again"
    np.testing.assert_array_equal(labels, reference_labels)
    pd.testing.assert_frame_equal(nuclei, reference_nuclei)
    assert not any(OutputFolder(out).blocks.glob("*")), "checkpoints go with the completion record"
    assert verify_output(out).intact


def test_a_file_of_the_same_name_added_beside_one_renames_it_without_a_second_row(tmp_path, tiny_bundle):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    files.write_plain(inputs / "x.png", nucleus_image(120))
    argv = ["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle), "--post-workers", "0"]
    assert main(argv) == 0 and list(images_table(out).index) == ["x"]
    tifffile.imwrite(inputs / "x.tif", nucleus_image(121))  # x and x: both keep their extension now
    assert main(argv) == 0
    rows = images_table(out)
    assert sorted(rows.index) == ["x.png", "x.tif"]
    assert set(pd.read_parquet(OutputFolder(out).nuclei)["image_id"]) == {"x.png", "x.tif"}
    assert sorted(image_groups(zarr.open_group(str(OutputFolder(out).masks), mode="r"))) == sorted(rows["store_path"])
    assert verify_output(out).intact
