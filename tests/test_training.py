"""`nucleibatch train` end to end: real Ray Train (2 DDP workers on the CPU), real files in the
DSB layout (the small generated set, tests/data/dsb).

The runs are tiny (6 images, 16 patches of 128 px per epoch) so that the module stays within a
few minutes on 2 cores; they check plumbing (files, resume, refusals), not model quality.
Fine-tuning (--init, --freeze-encoder-epochs) runs in tests/test_finetune.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import nucleibatch
from nucleibatch.cli import main
from tests.helpers.training import (
    METRIC_COLUMNS,
    has_colour,
    png_rgb,
    read_metrics,
    tiny_network,
    train_argv,
)


def read_tensorboard(path: Path) -> dict[str, list[tuple[int, str, object]]]:
    """Every summary value of a TensorBoard event file: tag -> [(step, kind, value)] (TFRecord framing
    read by hand; the protobuf messages of tensorboardX, which ray[train] installs)."""
    from tensorboardX.proto import event_pb2

    data, position, tags = path.read_bytes(), 0, {}
    while position < len(data):
        (length,) = struct.unpack("<Q", data[position : position + 8])
        position += 12  # length + its crc
        event = event_pb2.Event()
        event.ParseFromString(data[position : position + length])
        position += length + 4  # data + its crc
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            content = value.simple_value if kind == "simple_value" else value.image if kind == "image" else None
            tags.setdefault(value.tag, []).append((event.step, kind, content))
    return tags


@pytest.fixture(scope="module")
def first_run(ray_session, small_dsb_root, tmp_path_factory):
    """`train --epochs 2 --tensorboard` on 6 real images; returns (exit status, RUN_DIR, metrics rows)."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    status = main(train_argv(small_dsb_root, run_dir, "--epochs", "2", "--tensorboard"))
    rows = read_metrics(run_dir) if (run_dir / "metrics.csv").is_file() else []
    return status, run_dir, rows


@pytest.mark.slow
def test_train_writes_metrics_curves_and_a_loadable_bundle(first_run):
    status, run_dir, rows = first_run
    assert status == 0
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # numbered from 1, as the log's "epoch 1/2"
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
    assert model.config.in_channels == 1
    with torch.no_grad():
        out = model.network(torch.rand(1, 1, 64, 64))
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all()

    training = model.config.training
    assert training["n_train_images"] + training["n_val_images"] == 6
    assert training["n_val_images"] == len(training["val_image_ids"]) == 1
    assert training["workers"] == 2 and training["patches_per_epoch"] == 16 and training["patch_size"] == 128
    assert model.config.metrics["epochs"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bundle"] == str(bundle.resolve())
    assert summary["epochs_run"] == 2
    # from scratch: the default learning rate, and no init recorded
    assert training["learning_rate"] == 2e-3 and training["init"] is None and model.config.init is None
    assert summary["init"] is None


@pytest.mark.slow
def test_train_writes_a_validation_overlay_per_epoch(first_run, small_dsb_root):
    from nucleibatch.annotated import discover_annotated, iter_annotated
    from nucleibatch.training.overlays import OVERLAY_CROP, TRUE_RGB

    status, run_dir, rows = first_run
    assert status == 0
    overlays = sorted((run_dir / "overlays").glob("*.png"))
    assert [p.name for p in overlays] == ["epoch_001.png", "epoch_002.png"]
    # the one validation image (rank 0 holds it), shown whole or by its central crop
    val_id = nucleibatch.load_model(run_dir / "bundle").config.training["val_image_ids"][0]
    annotated = next(iter_annotated([s for s in discover_annotated([small_dsb_root]) if s.image_id == val_id]))
    expected = tuple(min(side, OVERLAY_CROP) for side in annotated.labels.shape)
    for path in overlays:
        rgb = png_rgb(path)
        assert rgb.shape == (*expected, 3)
        assert has_colour(rgb, TRUE_RGB)  # true outlines; predicted ones (green) depend on 2 epochs from scratch
        assert 0 < rgb.mean() < 255


@pytest.mark.slow
def test_tensorboard_logs_the_metrics_and_the_overlay_per_epoch(first_run):
    status, run_dir, rows = first_run
    assert status == 0
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    tags = read_tensorboard(events[0])
    for column in METRIC_COLUMNS[1:]:
        assert [(step, kind) for step, kind, _ in tags[column]] == [(1, "simple_value"), (2, "simple_value")], column
        assert [value for _, _, value in tags[column]] == pytest.approx([float(row[column]) for row in rows], rel=1e-5), column
    images = tags["validation_overlay"]
    assert [step for step, _, _ in images] == [1, 2]
    for _, kind, image in images:
        assert kind == "image" and image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
        assert (image.height, image.width) == png_rgb(run_dir / "overlays" / "epoch_001.png").shape[:2]


@pytest.mark.slow
def test_train_again_with_more_epochs_resumes(first_run, small_dsb_root, capfd):
    import ray

    status, run_dir, first_rows = first_run
    assert status == 0 and len(first_rows) == 2
    assert main(train_argv(small_dsb_root, run_dir, "--epochs", "3")) == 0
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert rows[:2] == first_rows  # the first two epochs come from the checkpoint, not retrained
    out, err = capfd.readouterr()
    message = "resuming after epoch 2/3"
    if message not in out + err:  # worker output reaches the driver asynchronously; read its log
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
        out = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.out"))
    assert message in out + err
    assert nucleibatch.load_model(run_dir / "bundle").config.metrics["epochs"] == 3


@pytest.mark.slow
def test_rerunning_a_finished_run_trains_nothing_more(first_run, small_dsb_root):
    _, run_dir, _ = first_run
    rows_before = read_metrics(run_dir)
    epochs = len(rows_before)  # 3 after the resume test, 2 when run alone
    assert main(train_argv(small_dsb_root, run_dir, "--epochs", str(epochs))) == 0
    assert read_metrics(run_dir) == rows_before
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == epochs
    assert nucleibatch.load_model(run_dir / "bundle").config.metrics["epochs"] == epochs


@pytest.mark.slow
def test_changed_encoder_on_the_same_run_dir_is_refused(first_run, small_dsb_root, capfd):
    _, run_dir, _ = first_run
    settings_before = (run_dir / "train_settings.json").read_text()
    metrics_before = (run_dir / "metrics.csv").read_text()
    assert main(train_argv(small_dsb_root, run_dir, "--epochs", "3", "--encoder", "mobilenet_v2")) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("nucleibatch train: error: ")
    assert "encoder" in err[0] and "--overwrite" in err[0]
    assert (run_dir / "train_settings.json").read_text() == settings_before
    assert (run_dir / "metrics.csv").read_text() == metrics_before


@pytest.mark.slow
def test_init_on_a_run_dir_trained_from_scratch_is_refused(first_run, small_dsb_root, capfd):
    _, run_dir, _ = first_run
    settings_before = (run_dir / "train_settings.json").read_text()
    assert main(train_argv(small_dsb_root, run_dir, "--epochs", "3", "--init", "default")) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nucleibatch train: error: ")
    assert "other init (None, now default)" in err[0] and "--overwrite" in err[0]
    assert (run_dir / "train_settings.json").read_text() == settings_before


def test_bad_patch_size_exits_2_with_one_line(small_dsb_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(train_argv(small_dsb_root, run_dir, "--epochs", "1", "--patch-size", "100")) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("nucleibatch train: error: ") and "--patch-size" in err[0]
    assert not run_dir.exists()


@pytest.mark.parametrize("bad", [["--workers", "two"], ["--epochs"], ["--no-such-option"]])
def test_unparsable_arguments_exit_2_with_one_line(small_dsb_root, tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as info:
        main(["train", str(small_dsb_root), "-o", str(tmp_path / "run"), *bad])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


def test_other_invalid_settings_exit_2(small_dsb_root, tmp_path, capsys):
    for extra, fragment in ((["--workers", "0"], "--workers"), (["--val-fraction", "1.0"], "--val-fraction"), (["--epochs", "0"], "--epochs")):
        assert main(["train", str(small_dsb_root), "-o", str(tmp_path / "run"), *extra]) == 2
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


# --- validation overlays, encoder freezing, --init: unit tests (no Ray) ---


def test_overlay_panel_draws_true_outlines_magenta_and_predicted_ones_green_on_top():
    from nucleibatch.training.overlays import (
        GAP,
        PREDICTED_RGB,
        TRUE_RGB,
        overlay_image,
        overlay_panel,
    )

    image = np.zeros((40, 50), np.float32)
    true = np.zeros((40, 50), np.int32)
    true[5:15, 5:15] = 1  # found by the prediction too
    true[20:30, 30:40] = 2  # missed
    predicted = np.zeros((40, 50), np.int32)
    predicted[5:15, 5:15] = 7
    predicted[25:35, 5:15] = 8  # a false positive
    rgb = overlay_image(image, true, predicted)
    assert rgb.shape == (40, 50, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[5, 10]) == PREDICTED_RGB  # shared outline: the prediction is drawn on top
    assert tuple(rgb[20, 35]) == TRUE_RGB and tuple(rgb[25, 10]) == PREDICTED_RGB
    assert tuple(rgb[10, 10]) == (0, 0, 0) and tuple(rgb[0, 0]) == (0, 0, 0)  # insides and background untouched

    big = np.full((1000, 900), 0.5, np.float32)
    panel = overlay_panel([image, big], [true, np.zeros(big.shape, np.int32)], [predicted, np.zeros(big.shape, np.int32)], crop=384)
    assert panel.shape == (384, 50 + GAP + 384, 3)  # the large image is shown by its central crop
    assert tuple(panel[39, 50 + GAP]) == (127, 127, 127) and tuple(panel[39, 50]) == (0, 0, 0)
    with pytest.raises(ValueError, match="differ in size"):
        overlay_image(image, true[:10], predicted)


def _train_steps(network, optimizer, steps=2):
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        network(torch.rand(2, 1, 32, 32)).square().mean().backward()
        optimizer.step()


def test_a_frozen_encoder_stays_as_it_was_and_learns_once_unfrozen():
    from nucleibatch.training.loop import encoder_of, set_encoder_trainable

    network = tiny_network()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2, weight_decay=0.1)  # decay too must not touch it
    encoder_before = {k: v.clone() for k, v in network.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in network.decoder.state_dict().items()}
    assert set_encoder_trainable(network, False) == len(list(network.encoder.parameters()))
    network.train()
    encoder_of(network).eval()  # as the training loop does while frozen: batch-norm statistics stay
    _train_steps(network, optimizer)
    after = network.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in encoder_before.items())  # weights and batch-norm buffers
    assert any(not torch.equal(network.decoder.state_dict()[k], v) for k, v in decoder_before.items())
    assert all(not p.requires_grad for p in network.encoder.parameters())

    set_encoder_trainable(network, True)
    network.train()
    _train_steps(network, optimizer)
    changed = [name for name, p in network.encoder.named_parameters() if not torch.equal(p, encoder_before[name])]
    assert len(changed) == len(list(network.encoder.parameters()))


def test_a_checkpoint_takes_precedence_over_init_weights():
    from nucleibatch.training.loop import starting_state

    network, other = tiny_network(), tiny_network()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    init_state = {k: v.half() if v.is_floating_point() else v for k, v in other.state_dict().items()}  # as a bundle holds them
    optimizer = torch.optim.AdamW(network.parameters())
    checkpoint = {"model": {k: v.clone() for k, v in network.state_dict().items()}, "optimizer": optimizer.state_dict(), "epoch": 5, "epoch_base": 1, "best_map": 0.5, "history": [{"epoch": 5}]}

    # epoch 5 (numbered from 1) finished: the loop's index 5 (from 0) is the next
    assert starting_state(network, optimizer, checkpoint, init_state) == (5, 0.5, [{"epoch": 5}], "checkpoint")
    # a checkpoint of an earlier version numbered its epochs from 0: the same state, the same start
    earlier = {**{k: v for k, v in checkpoint.items() if k != "epoch_base"}, "epoch": 4, "history": [{"epoch": 4}]}
    assert starting_state(network, optimizer, earlier, init_state) == (5, 0.5, [{"epoch": 5}], "checkpoint")
    assert torch.equal(network.encoder.conv1.weight, checkpoint["model"]["encoder.conv1.weight"])
    assert starting_state(network, optimizer, None, init_state)[3] == "init"
    assert torch.equal(network.encoder.conv1.weight, init_state["encoder.conv1.weight"].float())
    assert starting_state(network, optimizer, None, None) == (0, -1.0, [], "scratch")


def test_epochs_are_numbered_from_1_also_in_checkpoints_of_earlier_versions(tmp_path):
    """Checkpoints (state and reported metrics) number epochs from 1, as the log does; those of
    earlier versions numbered them from 0 (no epoch_base): read back, they are numbered from 1,
    so that such a run resumes after the right epoch and reports its best epoch the new way."""
    from nucleibatch.training.loop import STATE_NAME, load_checkpoint_state, numbered_from_one
    from nucleibatch.training.run import load_best_state

    old, new = tmp_path / "checkpoint_000001", tmp_path / "checkpoint_000003"
    for folder, state in (
        (old, {"epoch": 1, "history": [{"epoch": 0}, {"epoch": 1}]}),  # epochs 1 and 2, counted from 0
        (new, {"epoch": 3, "epoch_base": 1, "history": [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]}),
    ):  # fmt: skip
        folder.mkdir()
        torch.save({"model": {}, "optimizer": {}, "best_map": 0.5, **state}, folder / STATE_NAME)
    resumed = load_checkpoint_state(old, announce=False)
    assert resumed["epoch"] == 2 and [row["epoch"] for row in resumed["history"]] == [1, 2]
    assert load_checkpoint_state(new, announce=False)["epoch"] == 3
    assert numbered_from_one(resumed) == resumed  # converted once only
    # the best checkpoint's metrics, as Ray or metrics.json give them back
    assert load_best_state([(old, {"epoch": 1, "score": 0.6}), (new, {"epoch": 3, "epoch_base": 1, "score": 0.5})])[1]["epoch"] == 2
    assert load_best_state([(old, {"epoch": 1, "score": 0.4}), (new, {"epoch": 3, "epoch_base": 1, "score": 0.5})])[1]["epoch"] == 3


def test_resolve_init_takes_the_network_from_the_bundle_and_lowers_the_learning_rate(small_dsb_root, tmp_path):
    from nucleibatch.errors import UsageError
    from nucleibatch.model import DEFAULT_BUNDLE, sha256_file
    from nucleibatch.training.run import TrainSettings, _check_resume, _save_settings, resolve_init

    base = TrainSettings(data=[str(small_dsb_root)], run_dir=str(tmp_path / "run"))
    scratch, config, state = resolve_init(base)
    assert (scratch.encoder, scratch.architecture, scratch.learning_rate, state, config.init) == ("resnet18", "Unet", 2e-3, None, None)

    default = nucleibatch.load_model("default")
    tuned, config, state = resolve_init(TrainSettings(data=[str(small_dsb_root)], run_dir=str(tmp_path / "run"), init="default"))
    assert tuned.learning_rate == pytest.approx(2e-4)  # 10x lower than from scratch
    assert (tuned.encoder, tuned.architecture, tuned.init) == (default.config.encoder, default.config.architecture, "default")
    assert config.init == {"name": default.name, "source": "default", "sha256": sha256_file(DEFAULT_BUNDLE / "model.safetensors")}
    assert config.postprocess == default.config.postprocess and config.normalization == default.config.normalization
    assert all(torch.equal(state[k], v) for k, v in default.network.state_dict().items())
    assert resolve_init(TrainSettings(data=[str(small_dsb_root)], run_dir="r", init="default", learning_rate=1e-3))[0].learning_rate == 1e-3
    assert resolve_init(TrainSettings(data=[str(small_dsb_root)], run_dir="r", init="default", encoder="resnet18"))[0].encoder == "resnet18"

    # the same --init resumes; another one (or none) is refused
    _save_settings(tmp_path / "run", tuned)
    _check_resume(tmp_path / "run", resolve_init(TrainSettings(data=[str(small_dsb_root)], run_dir=str(tmp_path / "run"), init="default"))[0], False)
    same_by_path = resolve_init(TrainSettings(data=[str(small_dsb_root)], run_dir="r", init=str(DEFAULT_BUNDLE / "config.json")))[0]
    assert same_by_path.init == str(DEFAULT_BUNDLE.resolve())
    with pytest.raises(UsageError, match=r"other init \(default, now .*models/default\)"):
        _check_resume(tmp_path / "run", same_by_path, False)
    with pytest.raises(UsageError, match=r"other init \(default, now None\)"):
        _check_resume(tmp_path / "run", scratch, False)


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--init", "default", "--encoder", "mobilenet_v2"], ["--encoder mobilenet_v2 conflicts with --init default", "resnet18", "drop --encoder"]),
        (["--freeze-encoder-epochs", "2"], ["--freeze-encoder-epochs needs --init"]),
        (["--init", "no_such_bundle"], ["--init no_such_bundle", "not a model bundle"]),
        (["--init", "default", "--freeze-encoder-epochs", "-1"], ["--freeze-encoder-epochs must be >= 0"]),
    ],
)
def test_bad_fine_tuning_arguments_exit_2_with_one_line(small_dsb_root, tmp_path, capsys, extra, fragments):
    run_dir = tmp_path / "run"
    assert main(["train", str(small_dsb_root), "-o", str(run_dir), "--epochs", "1", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nucleibatch train: error: ")
    for fragment in fragments:
        assert fragment in err[0]
    assert not run_dir.exists()


def test_tensorboard_without_a_writer_library_exits_2(small_dsb_root, tmp_path, capsys, monkeypatch):
    import nucleibatch.training.run as run_module

    monkeypatch.setattr(run_module, "tensorboard_writer_class", lambda: None)
    assert main(["train", str(small_dsb_root), "-o", str(tmp_path / "run"), "--epochs", "1", "--tensorboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tensorboard needs tensorboardX" in err[0] and "pip install" in err[0]


LOCAL_RUN = ["--engine", "local", "--limit-images", "6", "--patches-per-epoch", "8", "--batch-size", "2", "--patch-size", "128", "--no-tune"]


@pytest.mark.slow
def test_engine_local_trains_resumes_and_exports_without_ray(small_dsb_root, tmp_path, capfd, monkeypatch):
    import nucleibatch.runtime.ray_start

    def no_ray(*args, **kwargs):
        raise AssertionError("--engine local started Ray")

    monkeypatch.setattr(nucleibatch.runtime.ray_start, "init_ray", no_ray)
    run_dir = tmp_path / "run"
    assert main(["train", str(small_dsb_root), "-o", str(run_dir), *LOCAL_RUN, "--epochs", "2", "--overlay-every", "0"]) == 0
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    checkpoints = sorted(p.name for p in (run_dir / "local_train").iterdir())
    assert checkpoints[-1] == "checkpoint_000002" and len(checkpoints) <= 2  # the latest and the best
    bundle = nucleibatch.load_model(run_dir / "bundle")
    assert bundle.config.training["engine"] == "local" and bundle.config.metrics["epochs"] == 2
    capfd.readouterr()

    assert main(["train", str(small_dsb_root), "-o", str(run_dir), *LOCAL_RUN, "--epochs", "3", "--overlay-every", "0"]) == 0
    out = capfd.readouterr().out
    assert "resuming after epoch 2/3" in out and "epoch 3/3 done" in out
    resumed = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in resumed] == [1, 2, 3] and resumed[:2] == rows
    assert json.loads((run_dir / "summary.json").read_text())["best_epoch"] in (1, 2, 3)

    # the same RUN_DIR under Ray Train would not find these checkpoints: refused
    assert main(["train", str(small_dsb_root), "-o", str(run_dir), *LOCAL_RUN[2:], "--epochs", "3"]) == 2
    err = capfd.readouterr().err
    assert "engine (local, now ray)" in err and "--overwrite" in err


def test_engine_local_takes_one_worker_only(small_dsb_root, tmp_path, capsys):
    assert main(["train", str(small_dsb_root), "-o", str(tmp_path / "run"), *LOCAL_RUN, "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--engine local" in err[0] and "--workers 1" in err[0]


@pytest.mark.slow
def test_ray_train_workers_start_with_the_allocator_settings(ray_session, tmp_path, monkeypatch):
    """The private Ray that `train` starts (init_ray) gives its job's workers the allocator settings
    in their start-up environment, which glibc reads only then (1.6-1.8x the patches/s of one CPU
    worker here); a Ray Train worker's /proc/self/environ holds them."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from nucleibatch.runtime.allocator import ALLOCATOR_ENV
    from nucleibatch.runtime.ray_start import init_ray

    monkeypatch.delenv("NUCLEIBATCH_DEFAULT_MALLOC", raising=False)

    def report_startup_environment(config):  # local: pickled by value, so the worker needs no tests package
        import json as json_module
        import tempfile

        import ray.train

        with open("/proc/self/environ", "rb") as handle:
            pairs = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
        environment = {key: pairs.get(key.encode(), b"").decode() for key in config["keys"]}
        with tempfile.TemporaryDirectory() as folder:  # Ray Train keeps metrics with a checkpoint
            ray.train.report({"environment": json_module.dumps(environment)}, checkpoint=ray.train.Checkpoint.from_directory(folder))

    ray.shutdown()  # a fresh private Ray, as `train` starts it
    init_ray(None)
    assert ray.is_initialized()
    trainer = TorchTrainer(
        report_startup_environment,
        train_loop_config={"keys": sorted(ALLOCATOR_ENV)},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="environment", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    assert result.error is None
    assert json.loads(result.metrics["environment"]) == ALLOCATOR_ENV
