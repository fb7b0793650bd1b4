"""Training for tissue: the haematoxylin input, stain jitter and blur, named validation images,
the scale recorded in the bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nucleibatch
from nucleibatch.annotated import discover_annotated, load_annotated
from nucleibatch.cli import main
from nucleibatch.errors import UsageError
from nucleibatch.training.data import AugmentSettings, random_patch, stained_window, to_example
from nucleibatch.training.run import split_by_list


def he_crops(tiles: Path, folder: Path, n: int = 3, side: int = 256) -> list[str]:
    """``n`` crops of the MoNuSeg-layout ``tiles`` as an images/ + labels/ folder; returns their ids."""
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    ids = []
    for source in discover_annotated([tiles])[:n]:
        annotated = load_annotated(source)
        name = f"{source.image_id[:12]}-crop"
        Image.fromarray(annotated.image[:side, :side, :3]).save(folder / "images" / f"{name}.png")
        Image.fromarray(annotated.labels[:side, :side].astype(np.uint16)).save(folder / "labels" / f"{name}.png")
        ids.append(name)
    return ids


@pytest.fixture(scope="module")
def stained_example(small_monuseg_root):
    annotated = load_annotated(discover_annotated([small_monuseg_root])[0])
    normalization = nucleibatch.model.normalization_config("haematoxylin")["normalization"]
    return to_example(annotated, normalization)


def test_a_stained_example_keeps_its_densities_and_patches_jitter_the_stain(stained_example):
    example = stained_example
    assert example.stain is not None and example.stain.density.shape == example.image.shape + (3,)
    # no jitter: the window as the whole image was normalised (statistics from a subsample)
    window = (100, 356, 200, 456)
    plain = stained_window(example.stain, window, np.random.default_rng(0), 0.0)
    np.testing.assert_allclose(plain, example.image[100:356, 200:456], atol=0.03)
    jittered = stained_window(example.stain, window, np.random.default_rng(0), 0.2)
    assert np.abs(jittered - plain).mean() > 0.005
    augment = AugmentSettings(stain=0.1, blur=1.0)
    first = random_patch(example, 128, np.random.default_rng(7), augment)
    again = random_patch(example, 128, np.random.default_rng(7), augment)
    np.testing.assert_array_equal(first[0], again[0])  # reproducible from the seed
    assert first[0].shape == (1, 128, 128) and first[1].shape == (3, 128, 128)
    without = random_patch(example, 128, np.random.default_rng(7), AugmentSettings())
    assert not np.array_equal(first[0], without[0])


def test_a_grey_example_has_no_stain_planes(small_dsb_root):
    annotated = load_annotated(discover_annotated([small_dsb_root])[0])
    example = to_example(annotated, nucleibatch.model.normalization_config("grey")["normalization"])
    assert example.stain is None
    x, _ = random_patch(example, 64, np.random.default_rng(0), AugmentSettings(stain=0.1))
    y, _ = random_patch(example, 64, np.random.default_rng(0), AugmentSettings())
    np.testing.assert_array_equal(x, y)  # the stain jitter touches stained examples only


def test_validation_images_named_in_a_file():
    assert split_by_list(["a", "b", "c", "d"], ["d", "b"]) == (["a", "c"], ["b", "d"])
    with pytest.raises(UsageError, match="not in DATA"):
        split_by_list(["a", "b"], ["z"])
    with pytest.raises(UsageError, match="nothing is left"):
        split_by_list(["a", "b"], ["a", "b"])


@pytest.mark.slow
def test_fine_tune_the_default_model_on_haematoxylin_records_input_scale_and_split(small_monuseg_root, tmp_path):
    data = tmp_path / "he"
    ids = he_crops(small_monuseg_root, data)
    val_file = tmp_path / "val.txt"
    val_file.write_text(f"# one crop\n{ids[1]}\n")
    run_dir = tmp_path / "run"
    argv = [
        "train", str(data), "-o", str(run_dir), "--engine", "local", "--init", "default", "--input", "haematoxylin",
        "--val-images", str(val_file), "--pixel-size", "0.25", "--blur", "0.5", "--scale-jitter", "0.8", "1.25", "--epochs", "1",
        "--patches-per-epoch", "4", "--batch-size", "2", "--patch-size", "128", "--no-tune", "--overlay-every", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((run_dir / "bundle" / "config.json").read_text())
    assert config["normalization"]["input"] == "haematoxylin" and config["normalization"]["invert"] == "never"
    assert config["serves"] == ["stained"]
    assert config["training"]["val_image_ids"] == [ids[1]] and config["training"]["n_train_images"] == 2
    assert config["training"]["augment"] == {"stain_jitter": 0.1, "blur": 0.5, "scale": [0.8, 1.25]}
    assert config["scale"]["pixel_size_um"] == 0.25 and 10 < config["scale"]["nucleus_diameter_px"] < 40
    model = nucleibatch.load_model(run_dir / "bundle")
    from nucleibatch.segment.array import segment_image

    labels = segment_image(load_annotated(discover_annotated([data])[1]).image, model)
    assert labels.shape == (256, 256)
    # the input is part of what a run means: resuming with another is refused
    assert main([*argv[:9], "grey", *argv[10:]]) == 2


def test_bad_tissue_training_arguments_exit_2(small_dsb_root, tmp_path, capsys):
    base = ["train", str(small_dsb_root), "-o", str(tmp_path / "run"), "--limit-images", "3"]
    for extra, fragment in (
        (["--val-images", str(tmp_path / "missing.txt")], "--val-images"),
        (["--pixel-size", "-1"], "--pixel-size"),
        (["--stain-jitter", "3"], "--stain-jitter"),
        (["--blur", "2"], "--blur"),
        (["--scale-jitter", "1.2", "1.5"], "--scale-jitter"),
    ):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
