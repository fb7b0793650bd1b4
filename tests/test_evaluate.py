"""Model bundles (save / load / errors) and the `evaluate` command against the Python API."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import nucleibatch
from nucleibatch.annotated import discover_annotated, iter_annotated, link_dsb_sample
from nucleibatch.cli import main
from nucleibatch.errors import ModelBundleError, ModelNotFoundError
from nucleibatch.evaluate import evaluate_model
from nucleibatch.model import (
    CONFIG_NAME,
    DEFAULT_BUNDLE,
    WEIGHTS_NAME,
    BundleConfig,
    build_network,
    default_config,
    load_model,
    save_bundle,
    sha256_file,
)
from nucleibatch.targets import make_targets
from nucleibatch.training.data import to_example

CSV_COLUMNS = ["image_id", "map", "ap50", "ap75", "f1_50", "n_true", "n_pred", "modality", "model", "pixel_size_um", "scale"]


def tiny_config() -> BundleConfig:
    return replace(default_config("resnet18", tile_size=256, halo=32), name="tiny-roundtrip", encoder_depth=3, decoder_channels=[32, 16, 8])


# --- bundle round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("half", [False, True])
def test_bundle_save_load_round_trip(tmp_path, half):
    torch.manual_seed(1)
    config = tiny_config()
    network = build_network(config).eval()
    directory = save_bundle(network, config, tmp_path / "bundle", half=half)
    assert (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()
    saved_config = json.loads((directory / CONFIG_NAME).read_text())
    assert saved_config["weights_sha256"] == sha256_file(directory / WEIGHTS_NAME)
    assert saved_config["weights_dtype"] == ("float16" if half else "float32")
    assert saved_config["classes"] == ["body", "contour", "contact"]

    model = load_model(directory, precision="float32")  # the float32 network, in its own layout: outputs compared exactly
    assert model.path == directory
    assert model.name == "tiny-roundtrip"
    assert model.sha256 == saved_config["weights_sha256"]
    assert not model.network.training
    expected = network.state_dict()
    loaded = model.network.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        if half and tensor.is_floating_point():
            tensor = tensor.half().float()
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        out = model.network(x)
        assert out.shape == (1, 3, 64, 64)
        if not half:
            torch.testing.assert_close(out, network(x), rtol=0, atol=0)
    # the config.json path and the package-level function load the same bundle
    again = nucleibatch.load_model(directory / CONFIG_NAME)
    assert again.path == directory and again.sha256 == model.sha256


def test_tiny_bundle_fixture_loads_and_predicts(tiny_bundle):
    model = load_model(tiny_bundle)
    assert model.config.in_channels == 1
    assert model.config.encoder_depth == 3
    probabilities = model.predict(np.random.default_rng(0).random((70, 90), dtype=np.float32))
    assert probabilities.shape == (3, 70, 90) and probabilities.dtype == np.float32
    assert 0.0 <= probabilities.min() and probabilities.max() <= 1.0


# --- bundle errors ---------------------------------------------------------------------------------


def copy_bundle(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_missing_bundle_folder(tmp_path):
    with pytest.raises(ModelBundleError, match="not a model bundle") as info:
        load_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelBundleError, match=f"no {CONFIG_NAME} found"):
        load_model(tmp_path / "empty")


def test_missing_weights(tmp_path, tiny_bundle):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    (bundle / WEIGHTS_NAME).unlink()
    with pytest.raises(ModelBundleError, match=f"weights file {WEIGHTS_NAME} is missing") as info:
        load_model(bundle)
    assert str(bundle) in str(info.value)


def test_weights_that_do_not_fit_the_config(tmp_path, tiny_bundle):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    config = json.loads((bundle / CONFIG_NAME).read_text())
    config["decoder_channels"] = [64, 32, 16]  # another network than the one saved
    (bundle / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ModelBundleError, match="weights do not fit the network") as info:
        load_model(bundle)
    assert str(bundle / WEIGHTS_NAME) in str(info.value)


# torch's load_state_dict message spans several lines; the CLI must still print one line.
def test_weights_that_do_not_fit_give_one_line_on_stderr(tmp_path, tiny_bundle, capsys):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    config = json.loads((bundle / CONFIG_NAME).read_text())
    config["decoder_channels"] = [64, 32, 16]
    (bundle / CONFIG_NAME).write_text(json.dumps(config))
    (tmp_path / "data").mkdir()
    assert main(["evaluate", str(tmp_path / "data"), "--model", str(bundle)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "weights do not fit" in err[0]


def test_truncated_weights(tmp_path, tiny_bundle):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    data = (bundle / WEIGHTS_NAME).read_bytes()
    (bundle / WEIGHTS_NAME).write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelBundleError, match=WEIGHTS_NAME):
        load_model(bundle)


def test_unreadable_or_incomplete_config(tmp_path, tiny_bundle):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    (bundle / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ModelBundleError, match="unreadable config"):
        load_model(bundle)
    config = json.loads((tiny_bundle / CONFIG_NAME).read_text())
    del config["classes"]
    (bundle / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ModelBundleError, match="lacks 'classes'"):
        load_model(bundle)


def test_default_bundle_loads_or_says_it_is_missing():
    # correct in both states of the repo: before and after the default model is shipped
    if (DEFAULT_BUNDLE / CONFIG_NAME).is_file():
        model = load_model("default")
        assert model.path == DEFAULT_BUNDLE
        assert not model.network.training
        assert model.config.in_channels == 1
        assert model.config.classes == ["body", "contour", "contact"]
        with torch.no_grad():
            assert model.network(torch.zeros(1, 1, 64, 64)).shape == (1, 3, 64, 64)
        assert (DEFAULT_BUNDLE / WEIGHTS_NAME).stat().st_size <= 32 * 1024 * 1024
        assert model.sha256 == sha256_file(DEFAULT_BUNDLE / WEIGHTS_NAME)
    else:
        with pytest.raises(ModelBundleError, match="default model is not in this installation"):
            load_model("default")


# --- evaluate: CLI against the Python API ---------------------------------------------------------


@pytest.fixture(scope="module")
def three_images(small_dsb_root, tmp_path_factory) -> Path:
    """A DSB-layout folder of three 256 x 256 images (of the small generated set), made of symlinks to their files."""
    folder = tmp_path_factory.mktemp("dsb3")
    picked = []
    for source in discover_annotated([small_dsb_root]):
        with Image.open(source.image_path) as image:
            if image.size == (256, 256):
                picked.append(source.image_path.parent.parent)
        if len(picked) == 3:
            break
    for path in picked:
        link_dsb_sample(path, folder)
    return folder


@pytest.fixture(scope="module")
def fitted_bundle(three_images, tmp_path_factory) -> Path:
    """The tiny U-Net whose last layer is fitted (a few L-BFGS steps on frozen features) to
    the three images' targets, so that it finds some nuclei and the scores are not all zero."""
    torch.manual_seed(0)
    config = tiny_config()
    network = build_network(config).eval()
    examples = [to_example(a, config.normalization) for a in iter_annotated(discover_annotated([three_images]))]
    features: list[torch.Tensor] = []
    hook = network.segmentation_head.register_forward_hook(lambda module, args, out: features.append(args[0].detach()))
    with torch.no_grad():
        for example in examples:
            network(torch.from_numpy(example.image)[None, None])
    hook.remove()
    x = torch.cat(features)
    y = torch.from_numpy(np.stack([make_targets(e.labels) for e in examples]))
    head = network.segmentation_head[0]
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return save_bundle(network, config, tmp_path_factory.mktemp("fitted") / "bundle")


def count_nonempty_masks(image_folder: Path) -> int:
    return sum(np.asarray(Image.open(p)).any() for p in sorted((image_folder / "masks").glob("*.png")))


@pytest.mark.slow
def test_evaluate_cli_matches_the_python_api(three_images, fitted_bundle, tmp_path, capsys):
    csv_path = tmp_path / "scores" / "per_image.csv"
    status = main(["evaluate", str(three_images), "--model", str(fitted_bundle), "--limit-images", "3", "--json", "--csv", str(csv_path)])
    assert status == 0
    out = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(out[-1])

    summary, rows = evaluate_model(load_model(fitted_bundle), [three_images], limit_images=3)
    assert printed["n_images"] == summary["n_images"] == 3
    for key in ("map", "ap50", "ap75", "f1_50"):
        assert printed[key] == pytest.approx(summary[key], abs=1e-12)
    assert summary["map"] > 0, "the fitted model should match some nuclei (else the comparison says little)"

    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CSV_COLUMNS
        table = list(reader)
    assert [r["image_id"] for r in table] == sorted(p.name for p in three_images.iterdir())
    for written, row in zip(table, rows, strict=True):
        assert written["image_id"] == row["image_id"]
        for key in ("map", "ap50", "ap75", "f1_50"):
            assert float(written[key]) == pytest.approx(row[key], abs=1e-12)
        assert int(written["n_pred"]) == row["n_pred"]
        # n_true counts the annotated nuclei: one non-empty mask PNG each
        assert int(written["n_true"]) == row["n_true"] == count_nonempty_masks(three_images / row["image_id"])
    assert np.mean([float(r["map"]) for r in table]) == pytest.approx(printed["map"])


@pytest.mark.slow
def test_evaluate_cli_text_summary_and_limit(three_images, fitted_bundle, capsys):
    assert main(["evaluate", str(three_images), "--model", str(fitted_bundle), "--limit-images", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 images: mAP@[.5:.95] ")
    assert "(model tiny-roundtrip, instances on cpu)" in out


def test_evaluate_cli_missing_model_is_one_line_on_stderr(three_images, tmp_path, capsys):
    status = main(["evaluate", str(three_images), "--model", str(tmp_path / "no_bundle")])
    assert status == ModelNotFoundError.exit_code == 2  # a usage error: --model names no bundle
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("nucleibatch evaluate: error: ")
    assert str(tmp_path / "no_bundle") in err[0]


def test_evaluate_cli_bad_argument_exits_2(three_images, capsys):
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(three_images), "--limit-images", "three"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--limit-images" in err[0]


# with no image left to score, evaluate must end with one clear line, not a traceback.
def test_evaluate_with_every_image_skipped_is_one_clear_error(tmp_path, tiny_bundle, capsys):
    folder = tmp_path / "data" / "img"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "images" / "img.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(folder / "masks" / "m.png")  # wrong size
    status = main(["evaluate", str(tmp_path / "data"), "--model", str(tiny_bundle), "--skip-bad"])
    assert status in (1, 2)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "WARNING" not in line]
    assert len(err) == 1 and err[0].startswith("nucleibatch evaluate: error: ")


def test_evaluate_with_instances_on_the_device_scores_like_the_watershed(dsb_root, capsys):
    """`evaluate --instances-on device` (torch, here on the CPU) on 8 real validation images of
    the default model: the same nuclei as the watershed's, and the same score within 0.01."""
    model = load_model("default", device="cpu")
    ids = model.config.training["val_image_ids"][:8]
    scores = {}
    for where in ("cpu", "device"):
        summary, rows = evaluate_model(model, [dsb_root], image_ids=ids, instances_on=where)
        assert summary["n_images"] == 8
        scores[where] = (summary, rows)
    assert scores["device"][0]["map"] == pytest.approx(scores["cpu"][0]["map"], abs=0.01)
    assert scores["cpu"][0]["map"] > 0.5
    for cpu_row, device_row in zip(scores["cpu"][1], scores["device"][1], strict=True):
        assert abs(cpu_row["n_pred"] - device_row["n_pred"]) <= max(1, 0.03 * cpu_row["n_pred"]), (cpu_row, device_row)
    assert main(["evaluate", str(dsb_root), "--model", "default", "--device", "cpu", "--instances-on", "device", "--limit-images", "1"]) == 0
    assert "instances on device" in capsys.readouterr().out
