"""Discovery of every input kind and lazy region readers (real files in tmp_path, nothing mocked)."""

from __future__ import annotations

import json
import pickle
import tracemalloc

import numpy as np
import pytest
import tifffile

from nucleibatch.errors import ImageReadError, UsageError
from nucleibatch.io.discover import ImageRecord, discover_inputs, strip_extension
from nucleibatch.io.readers import MIN_SIDE, guess_axes, open_source, plan_axes, read_image_file
from nucleibatch.output.folder import LABELS
from tests.helpers import input_files as files


def by_id(records: list[ImageRecord]) -> dict[str, ImageRecord]:
    return {r.image_id: r for r in records}


def as_hwc(array: np.ndarray) -> np.ndarray:
    return array[:, :, None] if array.ndim == 2 else array


def check_reads(record: ImageRecord, expected: np.ndarray) -> None:
    """Record metadata, a few regions and the overview against the ``(H, W[, C])`` array written."""
    expected = as_hwc(expected)
    height, width, channels = expected.shape
    assert record.error is None, record.error
    assert record.shape == (height, width) and record.channels == channels and record.dtype == str(expected.dtype)
    with open_source(record) as source:
        assert source.shape == (height, width) and source.channels == channels and source.dtype == expected.dtype
        np.testing.assert_array_equal(source.read(0, height, 0, width), expected)
        y0, x0 = height // 3, width // 4
        region = source.read(y0, y0 + 9, x0, x0 + 11)
        assert region.shape == (9, 11, channels) and region.dtype == expected.dtype
        np.testing.assert_array_equal(region, expected[y0 : y0 + 9, x0 : x0 + 11])
        np.testing.assert_array_equal(source.overview(), expected)  # small: the whole image
        if len(source.level_shapes) == 1:  # no pyramid: a strided read
            np.testing.assert_array_equal(source.overview(max_pixels=height * width // 4), expected[::2, ::2])


# --------------------------------------------------------------------------- pure rules


def test_axes_rule():
    plan = plan_axes("tzcyx", (2, 3, 4, 50, 60))
    assert plan.hw == (50, 60) and plan.channels == 4 and plan.index_axes == (0, 1)
    assert plan.planes()[:2] == [{"t": 0, "z": 0}, {"t": 0, "z": 1}] and len(plan.planes()) == 6
    assert plan_axes("cyxs", (2, 10, 10, 3)).channels == 6  # C and S both stack into channels
    assert plan_axes("iyx", (5, 10, 10)).index_axes == (0,)  # one unknown axis: pages
    with pytest.raises(ValueError, match="unknown meaning"):
        plan_axes("qqyx", (2, 3, 10, 10))
    with pytest.raises(ValueError, match="no y and x"):
        plan_axes("zcx", (2, 3, 10))
    with pytest.raises(ValueError, match="channels"):
        plan_axes("cyx", (1000, 10, 10))
    assert guess_axes((30, 40)) == ("y", "x")
    assert guess_axes((30, 40, 3)) == ("y", "x", "c")
    assert guess_axes((2, 30, 40)) == ("c", "y", "x")
    for ambiguous in [(30, 40, 50), (3, 40, 4), (2, 3, 30, 40)]:
        with pytest.raises(ValueError, match="axis names"):
            guess_axes(ambiguous)
    assert strip_extension("a/b.ome.tif") == "a/b" and strip_extension("x.PNG") == "x" and strip_extension("p.ome.zarr") == "p"


# --------------------------------------------------------------------------- folders of plain files


def test_plate_tree_of_png_jpeg_tiff(tmp_path):
    expected = files.write_plate_tree(tmp_path / "run")
    records = discover_inputs([str(tmp_path / "run")])
    assert [r.image_id for r in records] == sorted(expected)  # hidden, .txt/.csv/.json ignored
    found = by_id(records)
    assert found["plateA/B02/field_1"].kind == "plain" and found["plateA/B03/field_1"].kind == "tiff"
    assert found["plateA/B03/field_1"].dtype == "uint16" and found["plateB/C01/field_1"].channels == 4
    assert found["plateA/B02/field_2"].source.endswith("plateA/B02/field_2.jpg")
    for image_id, array in expected.items():
        check_reads(found[image_id], array)
    assert [r.image_id for r in discover_inputs([str(tmp_path / "run")])] == [r.image_id for r in records]  # stable


def test_single_file_input_and_grey_reads(tmp_path):
    image = files.grey((30, 20), 7)
    path = files.write_plain(tmp_path / "deep" / "cell image.png", image)
    [record] = discover_inputs([str(path)])
    assert record.image_id == "cell image" and record.source == str(path)
    with open_source(record) as source:
        assert source.read(0, 30, 0, 20).shape == (30, 20, 1)  # grey is (h, w, 1)
        for bad in [(0, 31, 0, 5), (-1, 5, 0, 5), (5, 5, 0, 5), (0, 5, 12, 3)]:
            with pytest.raises(ValueError, match="outside"):
                source.read(*bad)
    assert pickle.loads(pickle.dumps(record)) == record and len({record, record}) == 1
    assert ImageRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_dsb_layout_ids_and_masks_ignored(tmp_path):
    expected = files.write_dsb_tree(tmp_path / "train")
    records = discover_inputs([str(tmp_path / "train")])
    assert [r.image_id for r in records] == ["aaa111", "bbb222"]
    for record in records:
        check_reads(record, expected[record.image_id])
    # one sample folder given directly keeps the DSB id
    assert [r.image_id for r in discover_inputs([str(tmp_path / "train" / "bbb222")])] == ["bbb222"]
    # images/ + labels/ layout: ids are the file names, label images are not inputs
    files.write_plain(tmp_path / "pairs" / "images" / "f1.png", files.grey((16, 16), 1))
    files.write_plain(tmp_path / "pairs" / "images" / "f2.png", files.grey((16, 16), 2))
    files.write_plain(tmp_path / "pairs" / "labels" / "f1.png", np.ones((16, 16), np.uint8))
    assert [r.image_id for r in discover_inputs([str(tmp_path / "pairs")])] == ["f1", "f2"]


def test_real_dsb_folder(dsb_root):
    records = discover_inputs([str(dsb_root)])
    assert len(records) == 545 and all(r.error is None for r in records)
    assert all("/" not in r.image_id and "/images/" in r.source for r in records)
    for record in records[:3]:
        with open_source(record) as source:
            np.testing.assert_array_equal(source.read(0, record.shape[0], 0, record.shape[1]), as_hwc(read_image_file(record.path)))


# --------------------------------------------------------------------------- multi-image TIFF


def test_multipage_and_hyperstack_tiffs(tmp_path):
    stack = np.stack([files.grey((40, 48), s, np.uint16) for s in range(4)])
    files.write_tiff(tmp_path / "stack.tif", stack, metadata=None, photometric="minisblack")  # plain pages, no metadata: axes IYX
    hyper = np.stack([np.stack([np.stack([files.grey((32, 40), 10 * t + 3 * z + c) for c in range(2)]) for z in range(3)]) for t in range(2)])
    files.write_tiff(tmp_path / "hyper.tif", hyper, imagej=True, metadata={"axes": "TZCYX"})
    files.write_tiff(tmp_path / "five_d.tif", hyper)  # tifffile 'shaped' metadata only: axes QQQYX
    found = by_id(discover_inputs([str(tmp_path)]))
    for page in range(4):
        record = found[f"stack#i{page}"]
        assert record.source.endswith(f"stack.tif#i={page}")
        check_reads(record, stack[page])
    assert len([i for i in found if i.startswith("hyper#")]) == 6
    check_reads(found["hyper#t1-z2"], np.moveaxis(hyper[1, 2], 0, -1))
    assert found["hyper#t1-z2"].channels == 2
    assert "unknown meaning" in found["five_d"].error and found["five_d"].shape is None
    with pytest.raises(ImageReadError, match="unknown meaning"):
        open_source(found["five_d"])


def test_multiseries_ome_tiff(tmp_path):
    expected = files.write_multiseries_ome_tiff(tmp_path / "well.ome.tif")
    found = by_id(discover_inputs([str(tmp_path / "well.ome.tif")]))
    assert sorted(found) == ["well#s0", "well#s1-z0", "well#s1-z1"]
    assert found["well#s1-z1"].source.endswith("well.ome.tif#series=1,z=1")
    for suffix, array in expected.items():
        check_reads(found[f"well#{suffix}"], array)


def test_pyramidal_bigtiff_jpeg_uses_pyramid_for_overview(tmp_path):
    image = files.multichannel((512, 384), 3, 50)
    path = tmp_path / "slide.tif"
    files.write_pyramid_tiff(path, image, n_levels=3, compression="jpeg")
    decoded = [tifffile.imread(path, level=k) for k in range(3)]  # lossy: compare with tifffile's decode
    [record] = discover_inputs([str(path)])
    assert (record.kind, record.shape, record.channels, record.dtype) == ("tiff", (512, 384), 3, "uint8")
    with open_source(record) as source:
        assert source.level_shapes == [(512, 384), (256, 192), (128, 96)]
        np.testing.assert_array_equal(source.read(100, 300, 50, 333), decoded[0][100:300, 50:333])
        np.testing.assert_array_equal(source.overview(max_pixels=256 * 192), decoded[1])
        np.testing.assert_array_equal(source.overview(max_pixels=128 * 96 // 4), decoded[2][::2, ::2])
        np.testing.assert_array_equal(source.overview(), decoded[0])


def test_tiled_ome_tiff_multichannel_zlib(tmp_path):
    image = np.stack([files.grey((300, 260), 60 + c, np.uint16) for c in range(5)])  # (C, Y, X)
    path = tmp_path / "plate" / "field.ome.tif"
    levels = files.write_pyramid_tiff(path, image, n_levels=2, tile=(64, 64), ome=True, axes="CYX")
    [record] = discover_inputs([str(tmp_path / "plate")])
    assert record.image_id == "field" and record.channels == 5
    check_reads(record, np.moveaxis(image, 0, -1))
    with open_source(record) as source:
        np.testing.assert_array_equal(source.overview(max_pixels=150 * 130), np.moveaxis(levels[1], 0, -1))


def test_svs_keeps_the_slide_not_its_label_macro_thumbnail(tmp_path):
    image = np.tile(files.multichannel((128, 96), 3, 70), (8, 8, 1))  # 1024 x 768 RGB
    path = tmp_path / "case7.svs"
    files.write_svs_like(path, image)
    [record] = discover_inputs([str(tmp_path)])
    assert (record.image_id, record.shape, record.channels) == ("case7", (1024, 768), 3)
    baseline = tifffile.imread(path, series=0, level=0)
    with open_source(record) as source:
        assert source.level_shapes == [(1024, 768), (256, 192)]
        np.testing.assert_array_equal(source.read(300, 560, 200, 520), baseline[300:560, 200:520])
        np.testing.assert_array_equal(source.overview(max_pixels=256 * 192), tifffile.imread(path, series=0, level=1))


def _peak_bytes(function) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = function()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_large_tiled_tiff_is_read_lazily(tmp_path):
    tile = files.grey((512, 512), 80, np.uint16)
    image = np.tile(tile, (8, 8)) + (np.arange(4096, dtype=np.uint16)[:, None] // 512)  # 4096 x 4096, 32 MiB
    path = files.write_tiff(tmp_path / "big.tif", image, tile=(256, 256), compression="zlib", bigtiff=True)
    [record] = discover_inputs([str(path)])
    full_bytes = image.nbytes
    with open_source(record) as source:
        region, peak = _peak_bytes(lambda: source.read(0, 256, 0, 256))
        np.testing.assert_array_equal(region[:, :, 0], image[:256, :256])
        assert peak < full_bytes / 16, f"read of one tile used {peak / 2**20:.1f} MiB"
        region, peak = _peak_bytes(lambda: source.read(1000, 1300, 3000, 3500))
        np.testing.assert_array_equal(region[:, :, 0], image[1000:1300, 3000:3500])
        assert peak < full_bytes / 8
        overview, peak = _peak_bytes(lambda: source.overview())
        np.testing.assert_array_equal(overview[:, :, 0], image[::3, ::3])  # 16.8 MP -> every 3rd pixel
        assert peak < full_bytes / 3, f"overview used {peak / 2**20:.1f} MiB for a {full_bytes / 2**20:.0f} MiB image"


def test_uncompressed_tiff_is_memory_mapped(tmp_path):
    image = files.unique_values((2000, 1500), np.uint16)
    path = files.write_tiff(tmp_path / "raw.tif", image)  # one contiguous strip
    [record] = discover_inputs([str(path)])
    with open_source(record) as source:
        region, peak = _peak_bytes(lambda: source.read(1700, 1800, 20, 120))
        np.testing.assert_array_equal(region[:, :, 0], image[1700:1800, 20:120])
        assert peak < image.nbytes / 20 and not isinstance(region, np.memmap)
        np.testing.assert_array_equal(source.overview(max_pixels=750_000)[:, :, 0], image[::2, ::2])


# --------------------------------------------------------------------------- zarr


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_plain_zarr_arrays(tmp_path, zarr_format):
    grey = files.unique_values((50, 70), np.uint16)
    rgb = files.multichannel((40, 60), 3, 90)
    files.write_zarr_array(tmp_path / "grey.zarr", grey, zarr_format)
    files.write_zarr_array(tmp_path / "hwc.zarr", rgb, zarr_format)
    files.write_zarr_array(tmp_path / "chw.zarr", np.moveaxis(rgb, -1, 0).copy(), zarr_format)
    stack = np.stack([files.grey((40, 48), s, np.float32) for s in range(3)])
    files.write_zarr_array(tmp_path / "named.zarr", stack, zarr_format, dimension_names=["z", "y", "x"])
    files.write_zarr_array(tmp_path / "ambiguous.zarr", np.zeros((5, 40, 40), np.uint8), zarr_format)
    files.write_zarr_array(tmp_path / "five_d.zarr", np.zeros((2, 2, 2, 16, 16), np.uint8), zarr_format)
    found = by_id(discover_inputs([str(tmp_path)]))
    assert all(r.kind == "zarr" for r in found.values())
    check_reads(found["grey"], grey)
    check_reads(found["hwc"], rgb)
    check_reads(found["chw"], rgb)
    for z in range(3):
        check_reads(found[f"named#z{z}"], stack[z])
    assert "cannot tell" in found["ambiguous"].error and "dimension_names" in found["ambiguous"].error
    assert "5-D" in found["five_d"].error


@pytest.mark.filterwarnings("ignore:Call to deprecated class Scaler")  # inside ome-zarr-py
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_images_and_plate(tmp_path, version):
    image = np.stack([files.grey((256, 192), 100 + c, np.uint16) for c in range(2)])  # (C, Y, X)
    levels = files.write_ome_zarr(tmp_path / "img.ome.zarr", image, "cyx", version)
    fields = {}
    for group in ["A/1/0", "A/1/1", "B/2/0"]:
        fields[group] = files.grey((64, 64), hash(group) % 1000)
        files.write_ome_zarr(tmp_path / "plate.zarr", fields[group], "yx", version, n_levels=2, group=group)
    labels = files.write_ome_zarr(tmp_path / "plate.zarr", np.zeros((64, 64), np.uint8), "yx", version, n_levels=1, group=f"A/1/0/{LABELS}")
    assert labels  # written, and must not be an input
    found = by_id(discover_inputs([str(tmp_path)]))
    assert sorted(found) == ["img", "plate/A/1/0", "plate/A/1/1", "plate/B/2/0"]
    assert found["plate/A/1/1"].source.endswith("plate.zarr/A/1/1")
    check_reads(found["img"], np.moveaxis(image, 0, -1))
    with open_source(found["img"]) as source:
        assert source.level_shapes == [(256, 192), (128, 96), (64, 48)]
        np.testing.assert_array_equal(source.overview(max_pixels=128 * 96), np.moveaxis(levels[1], 0, -1))
    for group, array in fields.items():
        check_reads(found[f"plate/{group}"], array)


# --------------------------------------------------------------------------- manifests


def test_txt_and_csv_manifests(tmp_path):
    data = tmp_path / "data"
    a = files.write_plain(data / "a.png", files.grey((20, 24), 1))
    b = files.write_tiff(data / "sub" / "b.tif", files.grey((24, 20), 2, np.uint16))
    files.write_plain(data / "folder" / "c.png", files.grey((16, 16), 3))
    files.write_plain(data / "folder" / "d" / "e.png", files.grey((16, 16), 4))
    txt = files.write_manifest_txt(data / "list.txt", ["a.png", "  sub/b.tif  ", "# a comment", str(data / "folder"), "missing.png", "list.txt"])
    found = by_id(discover_inputs([str(txt)]))
    assert sorted(found) == ["a", "folder/c", "folder/d/e", "list.txt", "missing", "sub/b"]
    assert "not found" in found["missing"].error and "line" in found["missing"].error
    assert "not an image" in found["list.txt"].error
    check_reads(found["sub/b"], read_image_file(b))
    csv_path = files.write_manifest_csv(
        tmp_path / "other" / "m.csv", [{"path": "../data/a.png", "image_id": "first"}, {"path": str(b), "image_id": ""}]
    )
    found = by_id(discover_inputs([str(csv_path)]))
    assert sorted(found) == ["b", "first"]
    check_reads(found["first"], read_image_file(a))
    files.write_manifest_csv(tmp_path / "bad.csv", [{"file": "a.png"}])
    with pytest.raises(UsageError, match="'path' column"):
        discover_inputs([str(tmp_path / "bad.csv")])
    files.write_manifest_csv(tmp_path / "twice.csv", [{"path": str(a), "image_id": "x"}, {"path": str(b), "image_id": "x"}])
    with pytest.raises(UsageError, match="unique"):
        discover_inputs([str(tmp_path / "twice.csv")])


# --------------------------------------------------------------------------- dtypes, channels


def test_dtypes_and_channel_counts(tmp_path):
    arrays = {
        "u8": files.grey((20, 20), 1),
        "u16": files.grey((20, 20), 2, np.uint16),
        "f32": files.grey((20, 20), 3, np.float32),
        "i16": (files.grey((20, 20), 4, np.uint16) // 2).astype(np.int16),
        "rgba": files.multichannel((20, 20), 4, 5),
        "c64": files.multichannel((20, 20), 64, 6, np.uint16),
    }
    for name, array in arrays.items():
        kwargs = {"photometric": "minisblack", "planarconfig": "contig"} if name == "c64" else {}
        files.write_tiff(tmp_path / f"{name}.tif", array, **kwargs)
    files.write_plain(tmp_path / "png16.png", arrays["u16"])
    files.write_zarr_array(tmp_path / "complex.zarr", np.zeros((20, 20), np.complex64))
    found = by_id(discover_inputs([str(tmp_path)]))
    for name, array in arrays.items():
        check_reads(found[name], array)
    check_reads(found["png16"], arrays["u16"])
    assert found["c64"].channels == 64 and found["f32"].dtype == "float32"
    assert "complex64" in found["complex"].error and "float32" in found["complex"].error
    # --channel: images without that channel are failed records, not a stopped run
    found = by_id(discover_inputs([str(tmp_path)], channel=3))
    assert "--channel 3" in found["u8"].error and found["rgba"].error is None
    with pytest.raises(UsageError, match="channel"):
        discover_inputs([str(tmp_path)], channel=-1)


def test_big_endian_tiff_reads_native(tmp_path):
    image = files.unique_values((30, 40), np.uint16)
    files.write_tiff(tmp_path / "be.tif", image, byteorder=">")
    files.write_tiff(tmp_path / "bez.tif", image, byteorder=">", tile=(16, 16), compression="zlib")
    for record in discover_inputs([str(tmp_path)]):
        check_reads(record, image)


# --------------------------------------------------------------------------- bad inputs and ids


def test_bad_inputs_become_errors_not_crashes(tmp_path):
    expected = files.write_bad_inputs(tmp_path / "bad")
    files.write_plain(tmp_path / "bad" / "fine.png", files.grey((16, 16), 9))
    found = by_id(discover_inputs([str(tmp_path / "bad")]))
    assert sorted(found) == sorted([*expected, "fine"])
    assert found["fine"].error is None
    for image_id, word in expected.items():
        record = found[image_id]
        if word == "read":  # header fine, pixels damaged
            assert record.error is None
            with pytest.raises(ImageReadError, match=image_id), open_source(record) as source:
                source.read(0, record.shape[0], 0, record.shape[1])
        else:
            assert record.error and word in record.error, (image_id, record.error)
            assert "\n" not in record.error and record.shape is None
            with pytest.raises(ImageReadError, match=word):
                open_source(record)
    assert f"{MIN_SIDE}x{MIN_SIDE}" in found["dot"].error


def test_symlinked_folder_loop_does_not_hang(tmp_path):
    files.write_plain(tmp_path / "root" / "a" / "x.png", files.grey((16, 16), 1))
    (tmp_path / "root" / "a" / "back").symlink_to(tmp_path / "root", target_is_directory=True)
    assert [r.image_id for r in discover_inputs([str(tmp_path / "root")])] == ["a/x"]


def test_id_collisions(tmp_path):
    files.write_plain(tmp_path / "one" / "a.png", files.grey((16, 16), 1))
    files.write_tiff(tmp_path / "one" / "a.tif", files.grey((16, 16), 2))
    files.write_plain(tmp_path / "one" / "b.png", files.grey((16, 16), 3))
    assert [r.image_id for r in discover_inputs([str(tmp_path / "one")])] == ["a.png", "a.tif", "b"]
    files.write_plain(tmp_path / "two" / "b.png", files.grey((16, 16), 4))
    files.write_plain(tmp_path / "two" / "c.png", files.grey((16, 16), 5))
    ids = [r.image_id for r in discover_inputs([str(tmp_path / "one"), str(tmp_path / "two")])]
    assert ids == ["one/a.png", "one/a.tif", "one/b", "two/b", "two/c"]
    # roots with the same name: their parents tell them apart
    files.write_plain(tmp_path / "x" / "data" / "f.png", files.grey((16, 16), 6))
    files.write_plain(tmp_path / "y" / "data" / "f.png", files.grey((16, 16), 7))
    ids = [r.image_id for r in discover_inputs([str(tmp_path / "x" / "data"), str(tmp_path / "y" / "data")])]
    assert ids == ["x/data/f", "y/data/f"]
    # the same folder given twice is discovered once
    assert len(discover_inputs([str(tmp_path / "two"), str(tmp_path / "two" / "c.png")])) == 2


def test_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        discover_inputs([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UsageError, match="no images found"):
        discover_inputs([str(tmp_path / "empty")])
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(UsageError, match="not an image file"):
        discover_inputs([str(tmp_path / "data.json")])
    with pytest.raises(UsageError, match="no INPUT"):
        discover_inputs([])


def test_file_changed_since_discovery(tmp_path):
    path = files.write_plain(tmp_path / "a.png", files.grey((20, 20), 1))
    [record] = discover_inputs([str(path)])
    files.write_plain(path, files.grey((24, 20), 1))
    with pytest.raises(ImageReadError, match="changed"):
        open_source(record).read(0, 8, 0, 8)
    tif = files.write_tiff(tmp_path / "b.tif", files.grey((20, 20), 1))
    [record] = discover_inputs([str(tif)])
    files.write_tiff(tif, files.grey((20, 24), 1))
    with pytest.raises(ImageReadError, match="changed"):
        open_source(record)


def test_a_plain_image_is_decoded_once_per_process_until_the_file_changes(tmp_path, monkeypatch):
    """An image's plan and its block read open it apart (units of one process): the second open
    takes the pixels decoded by the first; a file rewritten since is decoded again."""
    import os

    from PIL import Image

    from nucleibatch.io.readers import plain

    decoded = []
    real_read = plain.read_image_file
    monkeypatch.setattr(plain, "read_image_file", lambda path: decoded.append(path) or real_read(path))
    path = tmp_path / "field.png"
    first = np.arange(24 * 30, dtype=np.uint8).reshape(24, 30)
    Image.fromarray(first).save(path)
    record = discover_inputs([str(path)])[0]
    for _ in range(3):
        source = open_source(record)
        block = source.read(0, 24, 0, 30)
        np.testing.assert_array_equal(block[:, :, 0], first)
        block[:] = 0  # a reader's copy: the pixels kept for the next open stay as decoded
        source.close()
    assert len(decoded) == 1
    Image.fromarray(first[::-1].copy()).save(path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    source = open_source(record)
    np.testing.assert_array_equal(source.read(0, 24, 0, 30)[:, :, 0], first[::-1])
    assert len(decoded) == 2
    plain.forget_decoded_images()  # a run's end
    open_source(record).read(0, 1, 0, 1)
    assert len(decoded) == 3
