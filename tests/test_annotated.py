"""Readers of annotated images (DSB layout and images/ + labels/ pairs) on real files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from nucleibatch.annotated import (
    MAX_OVERLAP_FRACTION,
    AnnotatedSource,
    discover_annotated,
    iter_annotated,
    load_annotated,
)
from nucleibatch.errors import BadAnnotationError, UsageError
from nucleibatch.output.folder import OutputFolder, label_path
from nucleibatch.synthetic import synthetic_nuclei

SHAPE = (64, 80)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_dsb(root: Path, image_id: str, seed: int = 0, shape=SHAPE, n_nuclei: int = 8) -> np.ndarray:
    """ROOT/<id>/images/<id>.png + one 0/255 PNG per nucleus in masks/; returns the labels."""
    image, labels = synthetic_nuclei(shape, n_nuclei=n_nuclei, radius=(4, 8), seed=seed)
    folder = root / image_id
    write_png(folder / "images" / f"{image_id}.png", np.stack([image] * 3 + [np.full_like(image, 255)], axis=2))
    (folder / "masks").mkdir(parents=True)
    for value in range(1, int(labels.max()) + 1):
        write_png(folder / "masks" / f"mask_{value:03d}.png", np.where(labels == value, 255, 0).astype(np.uint8))
    assert labels.max() >= 3, "the synthetic image should hold a few nuclei"
    return labels


def write_pairs(root: Path, name: str, seed: int = 0, suffix: str = ".png", shape=SHAPE) -> np.ndarray:
    image, labels = synthetic_nuclei(shape, n_nuclei=8, radius=(4, 8), seed=seed)
    if suffix == ".png":
        write_png(root / "images" / f"{name}.png", image)
        write_png(root / "labels" / f"{name}.png", labels.astype(np.uint16))
    else:
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / "images" / f"{name}{suffix}", image)
        tifffile.imwrite(root / "labels" / f"{name}{suffix}", labels.astype(np.uint32))
    return labels


def only_source(root: Path) -> AnnotatedSource:
    sources = discover_annotated([root])
    assert len(sources) == 1
    return sources[0]


def assert_bad(source: AnnotatedSource, *fragments: str) -> str:
    with pytest.raises(BadAnnotationError) as info:
        load_annotated(source)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message
    return message


# --- good annotations -------------------------------------------------------------------------


def test_dsb_layout_labels(tmp_path):
    labels = write_dsb(tmp_path, "img_a", seed=1)
    source = only_source(tmp_path)
    assert source.image_id == "img_a"
    assert source.image_path == tmp_path / "img_a" / "images" / "img_a.png"
    loaded = load_annotated(source)
    assert loaded.image_id == "img_a"
    assert loaded.image.shape == SHAPE + (4,)
    assert loaded.labels.dtype == np.int32
    # masks are numbered in sorted file-name order, which here is the synthetic order
    np.testing.assert_array_equal(loaded.labels, labels)


def test_dsb_root_may_be_a_single_image_folder(tmp_path):
    labels = write_dsb(tmp_path, "single", seed=2)
    source = only_source(tmp_path / "single")
    assert source.image_id == "single"
    np.testing.assert_array_equal(load_annotated(source).labels, labels)


def test_empty_mask_is_ignored(tmp_path):
    labels = write_dsb(tmp_path, "img", seed=3)
    write_png(tmp_path / "img" / "masks" / "mask_000.png", np.zeros(SHAPE, np.uint8))  # sorts first
    loaded = load_annotated(only_source(tmp_path))
    # same objects, numbered from 2 because the empty mask took index 1
    assert loaded.labels.max() == labels.max() + 1
    np.testing.assert_array_equal(loaded.labels > 0, labels > 0)
    np.testing.assert_array_equal(np.where(loaded.labels > 0, loaded.labels - 1, 0), labels)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_pairs_layout_labels(tmp_path, suffix):
    labels = write_pairs(tmp_path, "field_01", seed=4, suffix=suffix)
    source = only_source(tmp_path)
    assert source.image_id == "field_01"
    assert source.label_path == tmp_path / "labels" / f"field_01{suffix}"
    loaded = load_annotated(source)
    assert loaded.image.shape == SHAPE
    assert loaded.labels.dtype == np.int32
    np.testing.assert_array_equal(loaded.labels, labels)


def test_non_consecutive_label_values_are_kept(tmp_path):
    labels = np.zeros(SHAPE, np.uint16)
    labels[5:15, 5:15] = 7
    labels[30:40, 30:40] = 1000
    write_png(tmp_path / "images" / "x.png", np.zeros(SHAPE, np.uint8))
    write_png(tmp_path / "labels" / "x.png", labels)
    loaded = load_annotated(only_source(tmp_path))
    np.testing.assert_array_equal(loaded.labels, labels)


def test_rim_overlap_up_to_ten_percent_is_tolerated(tmp_path):
    # two 10x10 squares sharing a column of 10 pixels: 10 % of the smaller mask (the limit)
    assert MAX_OVERLAP_FRACTION == pytest.approx(0.1)
    folder = tmp_path / "rim"
    write_png(folder / "images" / "rim.png", np.zeros(SHAPE, np.uint8))
    first, second = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    first[10:20, 10:20] = 255
    second[10:20, 19:29] = 255
    write_png(folder / "masks" / "a.png", first)
    write_png(folder / "masks" / "b.png", second)
    labels = load_annotated(only_source(tmp_path)).labels
    # the shared pixels stay with the first mask; the second keeps the rest
    assert (labels == 1).sum() == 100
    assert (labels == 2).sum() == 90
    assert (labels[10:20, 19] == 1).all()
    assert (labels[10:20, 20:29] == 2).all()


# --- bad annotations ----------------------------------------------------------------------------


def test_mask_of_the_wrong_size(tmp_path):
    write_dsb(tmp_path, "img")
    bad = write_png(tmp_path / "img" / "masks" / "mask_999.png", np.full((SHAPE[0] + 1, SHAPE[1]), 255, np.uint8))
    assert_bad(only_source(tmp_path), str(bad), "wrong size", f"({SHAPE[0] + 1}, {SHAPE[1]})")


def test_truncated_mask_file(tmp_path):
    write_dsb(tmp_path, "img")
    mask = tmp_path / "img" / "masks" / "mask_002.png"
    data = mask.read_bytes()
    mask.write_bytes(data[: len(data) // 2])
    assert_bad(only_source(tmp_path), str(mask), "unreadable mask", "cannot decode")


def test_zero_byte_mask_file(tmp_path):
    write_dsb(tmp_path, "img")
    mask = tmp_path / "img" / "masks" / "mask_001.png"
    mask.write_bytes(b"")
    assert_bad(only_source(tmp_path), str(mask), "unreadable mask", "empty file")


def test_unreadable_image(tmp_path):
    write_dsb(tmp_path, "img")
    image = tmp_path / "img" / "images" / "img.png"
    image.write_bytes(b"this is not a png file at all")
    assert_bad(only_source(tmp_path), str(image), "cannot decode")


def test_image_without_masks(tmp_path):
    folder = tmp_path / "lonely"
    write_png(folder / "images" / "lonely.png", np.zeros(SHAPE, np.uint8))
    (folder / "masks").mkdir()
    assert_bad(only_source(tmp_path), str(folder / "images" / "lonely.png"), "without masks")


def test_image_without_a_masks_folder(tmp_path):
    folder = tmp_path / "lonely"
    write_png(folder / "images" / "lonely.png", np.zeros(SHAPE, np.uint8))
    assert_bad(only_source(tmp_path), "lonely.png", "without masks")


def test_masks_overlapping_by_many_pixels(tmp_path):
    # 10x10 squares overlapping on a 10x5 strip: 50 % of the smaller mask
    folder = tmp_path / "dup"
    write_png(folder / "images" / "dup.png", np.zeros(SHAPE, np.uint8))
    first, second = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    first[10:20, 10:20] = 255
    second[10:20, 15:25] = 255
    write_png(folder / "masks" / "a.png", first)
    write_png(folder / "masks" / "b.png", second)
    message = assert_bad(only_source(tmp_path), str(folder / "masks" / "b.png"), "overlaps", "a.png", "50 pixels")
    assert "--skip-bad" in message


def test_overlap_just_above_the_tolerance_is_refused(tmp_path):
    # both masks 101 px, 11 of them shared: above 10 % of the smaller mask
    folder = tmp_path / "dup"
    write_png(folder / "images" / "dup.png", np.zeros(SHAPE, np.uint8))
    first, second = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    first[10:20, 10:20] = 255
    second[10:20, 19:29] = 255
    first[20, 19] = second[20, 19] = 255  # one more shared pixel: 10 + 1
    write_png(folder / "masks" / "a.png", first)
    write_png(folder / "masks" / "b.png", second)
    assert_bad(only_source(tmp_path), "b.png", "overlaps", "11 pixels")


def test_label_image_of_the_wrong_size(tmp_path):
    write_png(tmp_path / "images" / "x.png", np.zeros(SHAPE, np.uint8))
    bad = write_png(tmp_path / "labels" / "x.png", np.zeros((SHAPE[0], SHAPE[1] + 3), np.uint16))
    assert_bad(only_source(tmp_path), str(bad), "wrong size", f"({SHAPE[0]}, {SHAPE[1] + 3})")


def test_float_label_image(tmp_path):
    (tmp_path / "labels").mkdir()
    write_png(tmp_path / "images" / "x.png", np.zeros(SHAPE, np.uint8))
    bad = tmp_path / "labels" / "x.tif"
    tifffile.imwrite(bad, np.ones(SHAPE, np.float32) * 1.5)
    assert_bad(only_source(tmp_path), str(bad), "integers", "float32")


def test_image_without_a_label_image(tmp_path):
    write_pairs(tmp_path, "has_label", seed=1)
    write_png(tmp_path / "images" / "no_label.png", np.zeros(SHAPE, np.uint8))
    sources = discover_annotated([tmp_path])
    assert [s.image_id for s in sources] == ["has_label", "no_label"]
    assert_bad(sources[1], "no_label.png", "without a label image")


def test_unreadable_label_image(tmp_path):
    write_png(tmp_path / "images" / "x.png", np.zeros(SHAPE, np.uint8))
    (tmp_path / "labels").mkdir()
    bad = tmp_path / "labels" / "x.tif"
    bad.write_bytes(b"II*\x00garbage")
    assert_bad(only_source(tmp_path), str(bad), "unreadable label image")


# --- iterating, skipping, several folders ------------------------------------------------------


def test_iter_annotated_raises_on_a_bad_image_by_default(tmp_path):
    write_dsb(tmp_path, "a_good", seed=1)
    write_dsb(tmp_path, "b_bad", seed=2)
    (tmp_path / "b_bad" / "masks" / "mask_001.png").write_bytes(b"")
    loaded = []
    with pytest.raises(BadAnnotationError, match="--skip-bad") as info:
        for item in iter_annotated(discover_annotated([tmp_path])):
            loaded.append(item.image_id)
    assert loaded == ["a_good"]
    assert "mask_001.png" in str(info.value)


def test_iter_annotated_skip_bad_warns_and_yields_the_good_ones(tmp_path, caplog):
    good_1 = write_dsb(tmp_path, "a_good", seed=1)
    write_dsb(tmp_path, "b_bad", seed=2)
    good_2 = write_dsb(tmp_path, "c_good", seed=3)
    write_png(tmp_path / "b_bad" / "masks" / "mask_001.png", np.full((10, 10), 255, np.uint8))
    with caplog.at_level(logging.WARNING, logger="nucleibatch.annotated"):
        loaded = list(iter_annotated(discover_annotated([tmp_path]), skip_bad=True))
    assert [a.image_id for a in loaded] == ["a_good", "c_good"]
    np.testing.assert_array_equal(loaded[0].labels, good_1)
    np.testing.assert_array_equal(loaded[1].labels, good_2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "b_bad" in warnings[0].getMessage()
    assert "wrong size" in warnings[0].getMessage()


def test_several_folders_of_both_layouts(tmp_path):
    dsb_1, dsb_2, pairs = tmp_path / "dsb1", tmp_path / "dsb2", tmp_path / "pairs"
    labels = {
        "d1_x": write_dsb(dsb_1, "d1_x", seed=1),
        "d1_y": write_dsb(dsb_1, "d1_y", seed=2),
        "d2_z": write_dsb(dsb_2, "d2_z", seed=3),
        "p_field": write_pairs(pairs, "p_field", seed=4),
    }
    sources = discover_annotated([pairs, dsb_2, dsb_1])
    assert [s.image_id for s in sources] == sorted(labels)
    loaded = {a.image_id: a.labels for a in iter_annotated(sources)}
    assert loaded.keys() == labels.keys()
    for image_id, expected in labels.items():
        np.testing.assert_array_equal(loaded[image_id], expected)


def test_same_image_id_in_two_folders_is_a_usage_error(tmp_path):
    write_dsb(tmp_path / "one", "same", seed=1)
    write_dsb(tmp_path / "two", "same", seed=2)
    with pytest.raises(UsageError, match="more than one folder"):
        discover_annotated([tmp_path / "one", tmp_path / "two"])


def test_missing_or_empty_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not a folder"):
        discover_annotated([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no annotated images found"):
        discover_annotated([tmp_path / "empty"])


# --- the real shared data -----------------------------------------------------------------------


def test_discover_the_real_dsb_folder(dsb_root):
    sources = discover_annotated([dsb_root])
    assert len(sources) == 545
    ids = [s.image_id for s in sources]
    assert ids == sorted(ids) and len(set(ids)) == 545
    first = sources[0]
    assert first.image_path == dsb_root / first.image_id / "images" / f"{first.image_id}.png"
    loaded = load_annotated(first)
    n_masks = len(list((dsb_root / first.image_id / "masks").glob("*.png")))
    assert loaded.labels.shape == loaded.image.shape[:2]
    assert loaded.labels.dtype == np.int32
    assert len(np.unique(loaded.labels[loaded.labels > 0])) == n_masks


# --- symbolic links: evaluate and train find what segment finds ---------------------------------


@pytest.fixture()
def linked_data(tmp_path):
    """DATA with a real sample ``a``, a link ``b`` to a sample folder elsewhere, a sample ``c`` made
    of links to files (link_dsb_sample), and a sample ``d`` whose masks folder is a link."""
    from nucleibatch.annotated import link_dsb_sample

    elsewhere, data = tmp_path / "elsewhere", tmp_path / "data"
    for seed, image_id in enumerate("abcd"):
        write_dsb(elsewhere, image_id, seed=seed, shape=(96, 96))
    data.mkdir()
    (elsewhere / "a").rename(data / "a")
    (data / "b").symlink_to(elsewhere / "b", target_is_directory=True)
    link_dsb_sample(elsewhere / "c", data)
    (data / "d" / "images").mkdir(parents=True)
    (elsewhere / "d" / "images" / "d.png").rename(data / "d" / "images" / "d.png")
    (data / "d" / "masks").symlink_to(elsewhere / "d" / "masks", target_is_directory=True)
    return data


def test_evaluate_and_segment_discovery_follow_the_same_symlinks(linked_data, tmp_path, caplog):
    """Links to files are followed, links to folders inside DATA / INPUT are not (logged), and a
    DATA / INPUT that is itself a link is followed: by segment's discovery and evaluate's alike."""
    from nucleibatch.io.discover import discover_inputs

    with caplog.at_level(logging.INFO, logger="nucleibatch.io.discover"):
        annotated = {s.image_id for s in discover_annotated([linked_data])}
        segmented = {r.image_id for r in discover_inputs([str(linked_data)])}
    assert annotated == segmented == {"a", "c", "d"}
    assert f"{linked_data / 'b'}: symbolic link to a folder, not followed" in caplog.text
    root_link = tmp_path / "data_link"
    root_link.symlink_to(linked_data, target_is_directory=True)
    assert {s.image_id for s in discover_annotated([root_link])} == {r.image_id for r in discover_inputs([str(root_link)])} == {"a", "c", "d"}
    # the sample made of links to files reads as the original; the one with a linked masks folder is a bad annotation
    sources = {s.image_id: s for s in discover_annotated([linked_data])}
    assert load_annotated(sources["c"]).labels.max() >= 3
    with pytest.raises(BadAnnotationError, match="symbolic link, not followed"):
        load_annotated(sources["d"])


def test_a_data_folder_of_linked_samples_says_why_nothing_is_found(linked_data, tmp_path):
    from nucleibatch.io.discover import discover_inputs

    only_links = tmp_path / "only_links"
    only_links.mkdir()
    (only_links / "b").symlink_to(linked_data.parent / "elsewhere" / "b", target_is_directory=True)
    with pytest.raises(UsageError, match=r"1 symbolic link\(s\) to folders are not followed"):
        discover_annotated([only_links])
    with pytest.raises(UsageError, match="no images found"):
        discover_inputs([str(only_links)])


def test_evaluate_scores_the_images_segment_would_segment(linked_data):
    """End to end: evaluate_model over DATA with a linked sample folder scores a, c and d (d's
    linked masks: skipped as a bad annotation with --skip-bad), never b."""
    from nucleibatch.evaluate import evaluate_model
    from nucleibatch.synthetic import threshold_model

    summary, rows = evaluate_model(threshold_model(), [linked_data], skip_bad=True)
    assert sorted(r["image_id"] for r in rows) == ["a", "c"] and summary["n_images"] == 2


# --------------------------------------------------------------------------- the annotation loop


def test_cellpose_pairs_are_read_with_either_mask_suffix_and_an_image_without_masks_is_bad(tmp_path):
    root = tmp_path / "cellpose"
    image_a, labels_a = synthetic_nuclei(SHAPE, n_nuclei=6, radius=(4, 8), seed=1)
    image_b, labels_b = synthetic_nuclei(SHAPE, n_nuclei=5, radius=(4, 8), seed=2)
    write_png(root / "a.png", image_a)
    write_png(root / "a_masks.png", labels_a.astype(np.uint16))  # Cellpose's training layout
    tifffile.imwrite(root / "b.tif", image_b)
    write_png(root / "b_cp_masks.png", labels_b.astype(np.uint16))  # what Cellpose writes
    write_png(root / "c.png", image_a)  # not annotated yet
    sources = discover_annotated([root])
    assert [s.image_id for s in sources] == ["a", "b", "c"]
    a, b = load_annotated(sources[0]), load_annotated(sources[1])
    np.testing.assert_array_equal(a.image, image_a)
    np.testing.assert_array_equal(a.labels, labels_a)
    np.testing.assert_array_equal(b.labels, labels_b)
    with pytest.raises(BadAnnotationError, match="NAME_masks.png"):
        load_annotated(sources[2])
    assert [i.image_id for i in iter_annotated(sources, skip_bad=True)] == ["a", "b"]


@pytest.fixture(scope="module")
def synthetic_fields_out(tmp_path_factory):
    """A finished segment OUT of two synthetic fields (the shipped model)."""
    from nucleibatch.segment.job import run_segment_job

    root = tmp_path_factory.mktemp("loop")
    for seed in (3, 4):
        image, _ = synthetic_nuclei((128, 160), n_nuclei=12, radius=(5, 9), seed=seed)
        write_png(root / "in" / f"field{seed}.png", image)
    run_segment_job([str(root / "in")], root / "out", model="default", device="cpu", progress=False)
    return root / "out"


def edit_labels(out: Path, store_path: str) -> np.ndarray:
    """What a user does in napari: delete one nucleus and split another in two; returns the edited labels."""
    import zarr

    array = zarr.open_group(OutputFolder(out).masks, mode="a")[store_path][label_path(0)]
    labels = np.asarray(array[:]).astype(np.int64)
    values, sizes = np.unique(labels[labels > 0], return_counts=True)
    assert len(values) >= 3, "the model should find a few nuclei in the synthetic field"
    labels[labels == values[0]] = 0  # a false positive deleted
    largest = values[np.argmax(sizes)]
    ys, xs = np.nonzero(labels == largest)
    right = xs > np.median(xs)
    labels[ys[right], xs[right]] = labels.max() + 1  # a merge split
    array[:] = labels.astype(np.uint32)
    return labels


def test_a_segment_out_with_edited_labels_is_read_as_annotations(synthetic_fields_out, tmp_path):
    import pandas as pd

    images = pd.read_parquet(OutputFolder(synthetic_fields_out).images).sort_values("image_id")
    edited = edit_labels(synthetic_fields_out, images.store_path.iloc[0])
    sources = discover_annotated([synthetic_fields_out])
    assert [s.image_id for s in sources] == list(images.image_id)
    first = load_annotated(sources[0])
    np.testing.assert_array_equal(first.labels, edited)  # the corrections are the targets
    original = np.asarray(Image.open(synthetic_fields_out.parent / "in" / f"{images.image_id.iloc[0]}.png"))
    np.testing.assert_array_equal(first.image, original)


def test_a_segment_out_without_image_copies_says_how_to_train_on_it(tmp_path):
    from nucleibatch.segment.job import run_segment_job
    from nucleibatch.segment.settings import SegmentSettings

    image, _ = synthetic_nuclei((96, 96), n_nuclei=6, radius=(5, 8), seed=5)
    write_png(tmp_path / "in" / "f.png", image)
    run_segment_job([str(tmp_path / "in")], tmp_path / "out", model="default", device="cpu", settings=SegmentSettings(store_image=False), progress=False)
    (source,) = discover_annotated([tmp_path / "out"])
    with pytest.raises(BadAnnotationError, match="--no-store-image"):
        load_annotated(source)


@pytest.mark.slow
def test_train_reads_cellpose_pairs_and_a_corrected_segment_out(synthetic_fields_out, tmp_path):
    """The loop's last step: `train` on what the user corrected (and Cellpose pairs beside it)."""
    import json
    import subprocess
    import sys

    cellpose = tmp_path / "cellpose"
    for seed in (6, 7):
        image, labels = synthetic_nuclei((128, 128), n_nuclei=8, radius=(5, 9), seed=seed)
        write_png(cellpose / f"f{seed}.png", image)
        write_png(cellpose / f"f{seed}_masks.png", labels.astype(np.uint16))
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "nucleibatch", "train", str(cellpose), str(synthetic_fields_out), "-o", str(run), "--engine", "local", "--init", "default",
         "--epochs", "1", "--patches-per-epoch", "4", "--batch-size", "2", "--patch-size", "64", "--no-tune", "--overlay-every", "0", "--val-fraction", "0.25"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 training and" in done.stderr or "3 training and 1 validation" in done.stderr, done.stderr[-2000:]
    assert json.loads((run / "bundle" / "config.json").read_text())["name"]
