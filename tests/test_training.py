"""`nucleibatch train` end to end: real Ray Train (2 DDP workers on the CPU), real DSB files.

The runs are tiny (6 images, 16 patches of 128 px per epoch) so that the module stays within a
few minutes on 2 cores; they check plumbing (files, resume, refusals), not model quality.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import nucleibatch
from nucleibatch.cli import main

SMALL_RUN = ["--workers", "2", "--limit-images", "6", "--patches-per-epoch", "16", "--batch-size", "2", "--patch-size", "128"]
METRIC_COLUMNS = ["epoch", "train_loss", "val_map", "val_ap50", "val_ap75", "val_f1_50", "lr", "patches_per_s", "epoch_seconds"]


def train_argv(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", str(data), "-o", str(run_dir), *SMALL_RUN, *extra]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == METRIC_COLUMNS
        return list(reader)


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture(scope="module")
def ray_session():
    """Ray Train starts a private local Ray inside `train`; shut it down after the module and check
    that none of the processes it started is left."""
    import ray

    before = set(_descendants(os.getpid()))  # e.g. multiprocessing's resource tracker of earlier tests
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)  # never join another cluster from the tests
        yield
    started = [pid for pid in _descendants(os.getpid()) if pid not in before]
    ray.shutdown()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in started):
        time.sleep(0.5)
    left = sorted(pid for pid in started if _alive(pid))
    assert not left, f"processes left after ray.shutdown(): {left}"


@pytest.fixture(scope="module")
def first_run(ray_session, dsb_root, tmp_path_factory):
    """`train --epochs 2` on 6 real images; returns (exit status, RUN_DIR, metrics rows, stdout)."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    status = main(train_argv(dsb_root, run_dir, "--epochs", "2"))
    rows = read_metrics(run_dir) if (run_dir / "metrics.csv").is_file() else []
    return status, run_dir, rows


@pytest.mark.slow
def test_train_writes_metrics_curves_and_a_loadable_bundle(first_run):
    status, run_dir, rows = first_run
    assert status == 0
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for row in rows:
        assert np.isfinite(float(row["train_loss"])) and float(row["train_loss"]) > 0
        assert 0.0 <= float(row["val_map"]) <= 1.0  # one validation image (10 % of 6, at least 1)
        assert float(row["patches_per_s"]) > 0
    curves = run_dir / "curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bundle = run_dir / "bundle"
    assert (bundle / "config.json").is_file() and (bundle / "model.safetensors").is_file()
    model = nucleibatch.load_model(bundle)
    assert not model.network.training
    assert model.config["in_channels"] == 1
    with torch.no_grad():
        out = model.network(torch.rand(1, 1, 64, 64))
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all()

    training = model.config["training"]
    assert training["n_train_images"] + training["n_val_images"] == 6
    assert training["n_val_images"] == len(training["val_image_ids"]) == 1
    assert training["workers"] == 2 and training["patches_per_epoch"] == 16 and training["patch_size"] == 128
    assert model.config["metrics"]["epochs"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bundle"] == str(bundle.resolve())
    assert summary["epochs_run"] == 2


@pytest.mark.slow
def test_train_again_with_more_epochs_resumes(first_run, dsb_root, capfd):
    import ray

    status, run_dir, first_rows = first_run
    assert status == 0 and len(first_rows) == 2
    assert main(train_argv(dsb_root, run_dir, "--epochs", "3")) == 0
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert rows[:2] == first_rows  # the first two epochs come from the checkpoint, not retrained
    out, err = capfd.readouterr()
    message = "resuming from the checkpoint of epoch 1"
    if message not in out + err:  # worker output reaches the driver asynchronously; read its log
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
        out = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.out"))
    assert message in out + err
    assert nucleibatch.load_model(run_dir / "bundle").config["metrics"]["epochs"] == 3


@pytest.mark.slow
def test_rerunning_a_finished_run_trains_nothing_more(first_run, dsb_root):
    _, run_dir, _ = first_run
    rows_before = read_metrics(run_dir)
    epochs = len(rows_before)  # 3 after the resume test, 2 when run alone
    assert main(train_argv(dsb_root, run_dir, "--epochs", str(epochs))) == 0
    assert read_metrics(run_dir) == rows_before
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == epochs
    assert nucleibatch.load_model(run_dir / "bundle").config["metrics"]["epochs"] == epochs


@pytest.mark.slow
def test_changed_encoder_on_the_same_run_dir_is_refused(first_run, dsb_root, capfd):
    _, run_dir, _ = first_run
    settings_before = (run_dir / "train_settings.json").read_text()
    metrics_before = (run_dir / "metrics.csv").read_text()
    assert main(train_argv(dsb_root, run_dir, "--epochs", "3", "--encoder", "mobilenet_v2")) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("nucleibatch train: error: ")
    assert "encoder" in err[0] and "--overwrite" in err[0]
    assert (run_dir / "train_settings.json").read_text() == settings_before
    assert (run_dir / "metrics.csv").read_text() == metrics_before


def test_bad_patch_size_exits_2_with_one_line(dsb_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(train_argv(dsb_root, run_dir, "--epochs", "1", "--patch-size", "100")) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("nucleibatch train: error: ") and "--patch-size" in err[0]
    assert not run_dir.exists()


@pytest.mark.parametrize("bad", [["--workers", "two"], ["--epochs"], ["--no-such-option"]])
def test_unparsable_arguments_exit_2_with_one_line(dsb_root, tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as info:
        main(["train", str(dsb_root), "-o", str(tmp_path / "run"), *bad])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


def test_other_invalid_settings_exit_2(dsb_root, tmp_path, capsys):
    for extra, fragment in ((["--workers", "0"], "--workers"), (["--val-fraction", "1.0"], "--val-fraction"), (["--epochs", "0"], "--epochs")):
        assert main(["train", str(dsb_root), "-o", str(tmp_path / "run"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0]


def test_missing_data_folder_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "no_data"), "-o", str(tmp_path / "run"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_data" in err[0] and "not a folder" in err[0]


# a start that fails on a mistyped DATA folder must not lock RUN_DIR for the corrected command.
def test_a_failed_start_does_not_lock_the_run_dir(tmp_path, capsys):
    from PIL import Image

    run_dir = tmp_path / "run"
    assert main(["train", str(tmp_path / "typo"), "-o", str(run_dir), "--epochs", "1"]) == 2
    capsys.readouterr()
    # the corrected DATA folder (with one bad annotation, so that this call stops before training)
    data = tmp_path / "data" / "img"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(data / "images" / "img.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(data / "masks" / "m.png")  # wrong size
    status = main(["train", str(tmp_path / "data"), "-o", str(run_dir), "--epochs", "1"])
    err = capsys.readouterr().err
    assert "holds a run with other" not in err
    assert status == 1 and "wrong size" in err
