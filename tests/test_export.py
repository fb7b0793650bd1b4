"""`nucleibatch export`: GeoJSON (QuPath), DSB RLE CSV, PNG and TIFF from a segment output.

Two outputs are exported: a real one (`run_segment_job` with the shipped model on two demo
images plus an empty PNG that fails) and a hand-made one written with zarr and pandas
(small 64 px chunks so nuclei cross chunk borders; a nucleus with a hole, one in two pieces,
a one-pixel one, a C-shaped one, an image without nuclei and a failed image). Everything
exported is read back with independent readers (json, csv, tifffile, PIL) and compared with
the zarr labels.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
import zarr
from PIL import Image
from scipy import ndimage as ndi

from nucleibatch.cli import main
from nucleibatch.errors import NotSegmentOutputError, UsageError
from nucleibatch.export import export_run
from nucleibatch.export.chunks import ChunkCache, iter_nucleus_masks
from nucleibatch.export.outlines import mask_outline, rasterise_geojson, rasterise_polygons
from nucleibatch.export.png import write_png16
from nucleibatch.export.rle import rle_decode, rle_encode
from nucleibatch.export.writers import write_tiff
from nucleibatch.measure import measure_labels, physical_columns
from nucleibatch.output.folder import IMAGES, OutputFolder, label_path
from nucleibatch.output.store import create_image_group, store_name
from nucleibatch.output.tables import IMAGES_SCHEMA, NUCLEI_SCHEMA
from nucleibatch.synthetic import synthetic_nuclei
from tests.helpers.outputs import DEMO_OUT_IDS

# --------------------------------------------------------------------------- fixtures


def special_labels() -> np.ndarray:
    """(150, 170) uint32 labels: synthetic nuclei plus shapes that test the outline convention."""
    _, labels = synthetic_nuclei((150, 170), n_nuclei=30, seed=3)
    labels[100:, :60] = 0
    labels[:, 150:] = 0
    top = int(labels.max())
    ring, two, dot, cee, edge = (top + k for k in range(1, 6))
    labels[105:115, 5:15] = ring
    labels[108:111, 8:12] = 0  # a hole
    labels[120:124, 5:9] = two
    labels[126:130, 5:9] = two  # second piece, 2 rows apart
    labels[135, 20] = dot
    labels[118:140, 30:50] = cee
    labels[123:135, 36:50] = 0  # C shape (open to the right)
    labels[140:150, 155:170] = edge  # touches the bottom-right corner, crosses the chunk at x = 128
    return labels


def write_out(out: Path, images: list[tuple[str, np.ndarray | None]], chunk: int = 64) -> Path:
    """A segment-like OUT written with zarr and pandas only (labels None: a failed image)."""
    root = zarr.open_group(str(OutputFolder(out).masks), mode="w", zarr_format=3)
    OutputFolder(out).nuclei.mkdir(parents=True)
    rows = []
    for image_id, labels in images:
        name = store_name(image_id)
        if labels is None:
            rows.append(dict(image_id=image_id, source=f"{image_id}.png", height=None, width=None, n_nuclei=None, status="failed", error="cannot read: the file is empty", seconds=0.1, store_path=name))
            continue
        group = create_image_group(root, name, image_id, labels.shape, 1, np.uint8, chunk=chunk)
        group[label_path(0)][:] = labels
        columns = measure_labels(labels, np.ones(labels.shape, np.float32))
        columns.update(physical_columns(columns, None))
        frame = pd.DataFrame({"image_id": [image_id] * len(columns["label"]), **columns})
        pq.write_table(pa.Table.from_pandas(frame, schema=NUCLEI_SCHEMA, preserve_index=False), OutputFolder(out).nuclei_part(name))
        rows.append(dict(image_id=image_id, source=f"{image_id}.png", height=labels.shape[0], width=labels.shape[1], n_nuclei=len(frame), status="ok", error=None, seconds=0.1, store_path=name))
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), OutputFolder(out).images)
    return out


@pytest.fixture(scope="module")
def synthetic_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export_synthetic") / "out"
    return write_out(out, [("plate/A01 field 1", special_labels()), ("empty", np.zeros((40, 50), np.uint32)), ("bad", None)])


def ok_images(out: Path) -> list[tuple[str, str, np.ndarray]]:
    """(image_id, store_path, labels) of the ok images of OUT, labels read whole from zarr."""
    images = pd.read_parquet(OutputFolder(out).images)
    root = zarr.open_group(str(OutputFolder(out).masks), mode="r")
    return [(r.image_id, r.store_path, root[r.store_path][label_path(0)][:]) for r in images.itertuples() if r.status == "ok"]


# --------------------------------------------------------------------------- pure functions


def test_rle_encode_hand_computed():
    mask = np.array([[0, 1, 0], [1, 1, 0], [0, 1, 1]], dtype=bool)
    # column-major, 1-based: col 0 -> pixel 2; col 1 -> 4, 5, 6; col 2 -> 9
    assert rle_encode(mask) == "2 1 4 3 9 1"
    assert rle_encode(np.ones((2, 2), bool)) == "1 4"  # a run continues into the next column
    assert rle_encode(np.zeros((3, 4), bool)) == ""
    assert np.array_equal(rle_decode("2 1 4 3 9 1", (3, 3)), mask)
    assert not rle_decode("", (3, 3)).any()
    with pytest.raises(ValueError):
        rle_decode("8 3", (3, 3))


def test_rle_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(50):
        shape = tuple(int(s) for s in rng.integers(1, 30, size=2))
        mask = rng.random(shape) < rng.uniform(0.05, 0.95)
        text = rle_encode(mask)
        assert np.array_equal(rle_decode(text, shape), mask)
        values = np.array(text.split(), dtype=int)
        starts, lengths = values[0::2], values[1::2]
        assert (starts[1:] > starts[:-1] + lengths[:-1]).all()  # increasing, separated runs


def polygon_area(ring) -> float:
    ring = np.asarray(ring, dtype=float)
    return 0.5 * float(np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1]))


def test_outline_one_pixel_and_shapes():
    polygons = mask_outline(np.ones((1, 1), bool), origin=(7, 3))
    assert len(polygons) == 1 and len(polygons[0]) == 1
    ring = polygons[0][0]
    # pixel (row 7, column 3) is the unit square x in [3, 4], y in [7, 8]
    assert sorted(map(tuple, ring[:-1].tolist())) == [(3, 7), (3, 8), (4, 7), (4, 8)]
    assert polygon_area(ring) == 1.0

    c_shape = np.zeros((9, 8), bool)
    c_shape[1:8, 1:7] = True
    c_shape[3:6, 3:7] = False
    ring_mask = np.zeros((7, 7), bool)
    ring_mask[1:6, 1:6] = True
    ring_mask[3, 3] = False
    pieces = np.zeros((6, 6), bool)
    pieces[0:2, 0:2] = True
    pieces[2:4, 2:4] = True  # touches the first piece only at a corner: a second piece
    for mask, n_polygons, n_rings in ((c_shape, 1, 1), (ring_mask, 1, 2), (pieces, 2, 1)):
        polygons = mask_outline(mask, origin=(10, 20))
        assert len(polygons) == n_polygons and len(polygons[0]) == n_rings
        for polygon in polygons:
            assert all(np.array_equal(r[0], r[-1]) for r in polygon)
            assert polygon_area(polygon[0]) > 0 and all(polygon_area(r) < 0 for r in polygon[1:])
        assert sum(polygon_area(r) for p in polygons for r in p) == mask.sum()  # area = pixel count
        painted = rasterise_polygons([[r.tolist() for r in p] for p in polygons], (10 + mask.shape[0], 20 + mask.shape[1]))
        assert np.array_equal(painted[10:, 20:] > 0, mask) and not painted[:10].any() and not painted[:, :20].any()
    # the C shape keeps its concave corners: 8 vertices (+ the closing one)
    assert len(mask_outline(c_shape)[0][0]) == 9


def test_outline_random_masks_rasterise_exactly():
    rng = np.random.default_rng(1)
    for number in range(200):
        shape = tuple(int(s) for s in rng.integers(1, 16, size=2))
        mask = rng.random(shape) < rng.uniform(0.2, 0.95)
        if number % 2:
            mask = ndi.binary_opening(mask)
        polygons = mask_outline(mask)
        painted = rasterise_polygons([[r.tolist() for r in p] for p in polygons], shape)
        assert np.array_equal(painted > 0, mask), number


def test_chunk_cache_reads_like_slicing(synthetic_out):
    array = zarr.open_group(str(OutputFolder(synthetic_out).masks), mode="r")[store_name("plate/A01 field 1")][label_path(0)]
    whole = array[:]
    rng = np.random.default_rng(2)
    for max_bytes in (1, 2**30):  # a one-chunk cache gives the same pixels
        cache = ChunkCache(array, max_bytes=max_bytes)
        for _ in range(20):
            y0, x0 = rng.integers(0, 140), rng.integers(0, 160)
            y1, x1 = rng.integers(y0 + 1, 151), rng.integers(x0 + 1, 171)
            assert np.array_equal(cache.read(y0, y1, x0, x1), whole[y0:y1, x0:x1])
    # nucleus by nucleus with a big enough cache, each of the 3 x 3 chunks is decoded once
    nuclei = pd.read_parquet(OutputFolder(synthetic_out).nuclei_part(store_name("plate/A01 field 1")))
    seen = 0
    for row, crop in iter_nucleus_masks(array, nuclei):
        box = whole[row.bbox_min_y : row.bbox_max_y, row.bbox_min_x : row.bbox_max_x]
        assert np.array_equal(crop, box == row.label) and crop.sum() == row.area
        seen += 1
    assert seen == len(nuclei)


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("which", ["demo_segment_out", "synthetic_out"])
def test_dsb_rle_decodes_to_the_labels(which, request, tmp_path):
    out = request.getfixturevalue(which)
    summary = export_run(out, "dsb-rle", tmp_path / "rle", progress=False)
    with open(tmp_path / "rle" / "submission.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["ImageId", "EncodedPixels"]
    images = ok_images(out)
    assert {r[0] for r in rows[1:]} == {image_id for image_id, _, _ in images}  # failed ones are absent
    total = 0
    for image_id, _, labels in images:
        encoded = [r[1] for r in rows[1:] if r[0] == image_id]
        values = np.unique(labels[labels > 0])
        if values.size == 0:
            assert encoded == [""]  # one row with empty EncodedPixels
            continue
        assert len(encoded) == values.size
        union = np.zeros(labels.shape, dtype=np.int32)
        found = set()
        for text in encoded:
            mask = rle_decode(text, labels.shape)
            value = np.unique(labels[mask])
            assert value.size == 1 and value[0] > 0
            assert np.array_equal(mask, labels == value[0])  # exactly one nucleus
            found.add(int(value[0]))
            union += mask
        assert found == set(values.tolist())
        assert np.array_equal(union, (labels > 0).astype(np.int32))  # union = foreground, no overlap
        total += values.size
    assert summary.n_nuclei == total and summary.failed == (["broken"] if which == "demo_segment_out" else ["bad"])


@pytest.mark.parametrize("which", ["demo_segment_out", "synthetic_out"])
def test_geojson_structure_and_round_trip(which, request, tmp_path):
    out = request.getfixturevalue(which)
    summary = export_run(out, "geojson", tmp_path / "gj", progress=False)
    nuclei = pd.read_parquet(OutputFolder(out).nuclei)
    images = ok_images(out)
    assert sorted(p.name for p in summary.files) == sorted(f"{store_path}.geojson" for _, store_path, _ in images)
    for image_id, store_path, labels in images:
        path = tmp_path / "gj" / f"{store_path}.geojson"
        collection = json.loads(path.read_text())
        assert collection["type"] == "FeatureCollection"
        features = collection["features"]
        mine = nuclei[nuclei.image_id == image_id].set_index("label")
        assert len(features) == len(mine)
        assert len({f["id"] for f in features}) == len(features)
        for feature in features:
            props = feature["properties"]
            assert feature["type"] == "Feature" and props["objectType"] == "detection"
            assert props["classification"]["name"] == "Nucleus" and props["image_id"] == image_id
            label = props["label"]
            assert props["measurements"]["area"] == mine.loc[label, "area"]
            assert set(props["measurements"]) >= {"area", "perimeter", "eccentricity", "solidity", "mean_intensity"}
            _, n_pieces = ndi.label(labels == label)
            geometry = feature["geometry"]
            assert geometry["type"] == ("Polygon" if n_pieces == 1 else "MultiPolygon")
            polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
            for polygon in polygons:
                for ring in polygon:
                    assert ring[0] == ring[-1] and len(ring) >= 5 and all(len(p) == 2 for p in ring)
            assert sum(polygon_area(r) for p in polygons for r in p) == mine.loc[label, "area"]
        painted = rasterise_geojson(path, labels.shape)
        for label in mine.index:  # the requirement: IoU >= 0.95 per nucleus (the convention gives 1.0)
            a, b = painted == label, labels == label
            assert (a & b).sum() / (a | b).sum() >= 0.95
        assert np.array_equal(painted, labels)  # in fact exact


def test_geojson_special_shapes(synthetic_out, tmp_path):
    export_run(synthetic_out, "geojson", tmp_path, image_ids=["plate/A01 field 1"], progress=False)
    labels = special_labels()
    top = int(labels.max()) - 5
    name = store_name("plate/A01 field 1")
    features = {f["properties"]["label"]: f["geometry"] for f in json.loads((tmp_path / f"{name}.geojson").read_text())["features"]}
    assert features[top + 1]["type"] == "Polygon" and len(features[top + 1]["coordinates"]) == 2  # ring: exterior + hole
    assert features[top + 2]["type"] == "MultiPolygon" and len(features[top + 2]["coordinates"]) == 2
    dot = features[top + 3]  # pixel (row 135, column 20): the unit square x 20..21, y 135..136
    assert dot["type"] == "Polygon" and len(dot["coordinates"]) == 1 and dot["coordinates"][0][0] == dot["coordinates"][0][-1]
    assert sorted(map(tuple, dot["coordinates"][0][:-1])) == [(20, 135), (20, 136), (21, 135), (21, 136)]
    assert polygon_area(dot["coordinates"][0]) == 1.0
    assert len(features[top + 4]["coordinates"][0]) == 9  # the C keeps its 8 corners
    assert max(x for x, _ in features[top + 5]["coordinates"][0]) == 170  # the image's right edge


def test_png_and_tiff_equal_the_labels(demo_segment_out, synthetic_out, tmp_path):
    for out in (demo_segment_out, synthetic_out):
        png = export_run(out, "png", tmp_path / out.parent.name / "png", progress=False)
        tif = export_run(out, "tiff", tmp_path / out.parent.name / "tif", progress=False)
        images = ok_images(out)
        assert len(png.files) == len(tif.files) == len(images)
        for _, store_path, labels in images:
            as_png = np.asarray(Image.open(tmp_path / out.parent.name / "png" / f"{store_path}.png"))
            as_tif = tifffile.imread(tmp_path / out.parent.name / "tif" / f"{store_path}.tif")
            assert as_png.dtype == np.uint16 and np.array_equal(as_png, labels)
            assert as_tif.dtype == np.uint32 and np.array_equal(as_tif, labels)
    # the tiled path (big images): tiles of the zarr chunk size, read back identical
    array = zarr.open_group(str(OutputFolder(synthetic_out).masks), mode="r")[store_name("plate/A01 field 1")][label_path(0)]
    write_tiff(array, tmp_path / "tiled.tif", whole_pixels=0)
    with tifffile.TiffFile(tmp_path / "tiled.tif") as handle:
        page = handle.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (64, 64) and page.compression == 8  # zlib
        assert np.array_equal(page.asarray(), array[:])


def test_streamed_png_and_tiled_tiff_of_odd_chunks(tmp_path):
    labels = np.zeros((100, 70), np.uint32)
    labels[10:90, 5:65] = np.arange(1, 81, dtype=np.uint32)[:, None] * 700  # up to 56000, every row differs
    array = zarr.create_array(str(tmp_path / "l.zarr"), shape=labels.shape, chunks=(30, 30), dtype=np.uint32, zarr_format=3)
    array[:] = labels
    write_png16(array, tmp_path / "rows.png", band_bytes=1)  # one row per band
    assert np.array_equal(np.asarray(Image.open(tmp_path / "rows.png")), labels)
    write_tiff(array, tmp_path / "odd.tif", whole_pixels=0)  # chunks not multiples of 16: 512 px tiles
    with tifffile.TiffFile(tmp_path / "odd.tif") as handle:
        assert handle.pages[0].is_tiled and np.array_equal(handle.pages[0].asarray(), labels)
    array[50, 50] = 65536  # the table said otherwise: the band check still refuses, leaves no file
    with pytest.raises(UsageError, match="--format tiff"):
        write_png16(array, tmp_path / "big.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.zarr", "odd.tif", "rows.png"]


def test_png_refuses_labels_above_16_bits(tmp_path, capsys):
    labels = np.zeros((30, 30), np.uint32)
    labels[2:6, 2:6] = 70000
    out = write_out(tmp_path / "out", [("many", labels)])
    with pytest.raises(UsageError, match="--format tiff"):
        export_run(out, "png", progress=False)
    assert not list(OutputFolder(out).exports.rglob("*.png"))
    assert main(["export", str(out), "--format", "png"]) == 2
    assert "--format tiff" in capsys.readouterr().err
    assert main(["export", str(out), "--format", "tiff", "--no-progress"]) == 0
    assert np.array_equal(tifffile.imread(OutputFolder(out).export("tiff") / "many.tif"), labels)


# --------------------------------------------------------------------------- CLI and errors


def test_cli_exports_and_reports_failed_images(demo_segment_out, capsys):
    assert main(["export", str(demo_segment_out), "--format", "geojson", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "exported 2 images" in captured.out and str(OutputFolder(demo_segment_out).export("geojson")) in captured.out
    assert "skipped 1 failed image" in captured.err and "broken" in captured.err
    assert len(list(OutputFolder(demo_segment_out).export("geojson").glob("*.geojson"))) == 2
    # --images: only the one asked for
    dest = demo_segment_out.parent / "one"
    assert main(["export", str(demo_segment_out), "--format", "dsb-rle", "-o", str(dest), "--images", DEMO_OUT_IDS[1]]) == 0
    rows = pd.read_csv(dest / "submission.csv")
    assert set(rows.ImageId) == {DEMO_OUT_IDS[1]} and "failed" not in capsys.readouterr().err


def test_cli_usage_errors(tmp_path, demo_segment_out, capsys):
    assert main(["export", str(tmp_path / "missing"), "--format", "geojson"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "notout").mkdir()
    assert main(["export", str(tmp_path / "notout"), "--format", "tiff"]) == 2
    err = capsys.readouterr().err
    assert "not a segment output" in err and IMAGES in err
    with pytest.raises(NotSegmentOutputError):
        export_run(tmp_path / "notout", "png")
    assert main(["export", str(demo_segment_out), "--format", "png", "--images", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(demo_segment_out), "--format", "shapefile"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
