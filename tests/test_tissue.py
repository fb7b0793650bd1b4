"""Tissue and physical scale: pixel-size readers, the modality rule, the haematoxylin input,
resampling to a model's scale (labels at the input's resolution), the micrometre columns and
the OME-Zarr scale metadata, per-image model choice."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from nucleibatch.annotated import discover_annotated, load_annotated
from nucleibatch.errors import UsageError
from nucleibatch.instances import InstanceParams
from nucleibatch.io.discover import discover_inputs
from nucleibatch.io.readers import read_image_file
from nucleibatch.io.readers.ome_zarr import ome_zarr_pixel_size
from nucleibatch.io.readers.tiff import ome_xml_pixel_size
from nucleibatch.metrics import image_scores
from nucleibatch.modality import classify_modality
from nucleibatch.normalize import (
    apply_stats,
    compute_stats,
    haematoxylin_density,
    network_channel,
    normalise_pixels,
)
from nucleibatch.output.folder import OutputFolder, label_path
from nucleibatch.scale import (
    AUTO_PULL,
    check_diameter,
    from_network_scale,
    network_box,
    resample_scale,
    to_network_scale,
)
from nucleibatch.segment.array import densest_window, segment_image
from nucleibatch.segment.choose import ModelSet, choose
from nucleibatch.segment.job import run_segment_job
from nucleibatch.segment.settings import SegmentSettings
from nucleibatch.synthetic import synthetic_nuclei, threshold_model

# --------------------------------------------------------------------------- pixel size readers


def rgb(shape=(48, 64), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)


def test_pixel_size_of_every_tiff_flavour(tmp_path):
    tifffile.imwrite(tmp_path / "ome.ome.tif", rgb(), photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65})
    tifffile.imwrite(tmp_path / "nm.ome.tif", rgb(), photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 325.0, "PhysicalSizeXUnit": "nm"})
    tifffile.imwrite(tmp_path / "svs.svs", rgb(), photometric="rgb", description="Aperio Image Library v12.0.15\r\n64x48 (256x256) JPEG/RGB Q=70|AppMag = 20|MPP = 0.4990|Filename = x")
    tifffile.imwrite(tmp_path / "cm.tif", rgb(), photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "inch.tif", rgb(), photometric="rgb", resolution=(25400 / 0.25, 25400 / 0.25), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "imagej.tif", rgb()[..., 0], imagej=True, resolution=(1 / 0.325, 1 / 0.325), metadata={"unit": "micron"})
    tifffile.imwrite(tmp_path / "dpi72.tif", rgb(), photometric="rgb", resolution=(72, 72), resolutionunit="INCH")  # a drawing program's
    tifffile.imwrite(tmp_path / "dpi1200.tif", rgb(), photometric="rgb", resolution=(1200, 1200), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "bare.tif", rgb(), photometric="rgb")
    found = {r.image_id: r.pixel_size_um for r in discover_inputs([str(tmp_path)])}
    assert found == pytest.approx({"ome": 0.65, "nm": 0.325, "svs": 0.499, "cm": 0.5, "inch": 0.25, "imagej": 0.325, "dpi72": None, "dpi1200": None, "bare": None})


def test_pixel_size_of_ome_zarr_and_of_our_own_output(tmp_path):
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image

    root = zarr.open_group(str(tmp_path / "in" / "img.ome.zarr"), mode="w", zarr_format=3)
    write_image(rgb((64, 64))[..., 0], root, axes="yx", fmt=FormatV05(), scale_factors=[2], scale={"y": 0.4, "x": 0.4})
    assert discover_inputs([str(tmp_path / "in")])[0].pixel_size_um is None  # ome-zarr-py 0.18 writes no unit: unknown
    attributes = root.attrs.asdict()
    axes = [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    attributes["ome"]["multiscales"][0]["axes"] = axes  # as bioformats2raw writes them
    root.attrs.put(attributes)
    assert discover_inputs([str(tmp_path / "in")])[0].pixel_size_um == pytest.approx(0.4)
    # a multiscale transformation multiplies the dataset's; an axis without a known unit gives no size
    multiscale = {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 2.0]}]}], "coordinateTransformations": [{"type": "scale", "scale": [0.1, 0.1]}]}
    assert ome_zarr_pixel_size(multiscale) == pytest.approx(0.2)
    assert ome_zarr_pixel_size({**multiscale, "axes": [{"name": "y"}, {"name": "x"}]}) is None
    assert ome_xml_pixel_size('<OME xmlns="x"><Image><Pixels PhysicalSizeY="2" PhysicalSizeYUnit="mm"/></Image></OME>') is None  # 2 mm: not a microscope's pixel

    # segment's output carries the size on into an OME-Zarr that reads back the same
    (tmp_path / "tif").mkdir()
    tifffile.imwrite(tmp_path / "tif" / "a.ome.tif", synthetic_nuclei((96, 96), seed=1)[0], metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    out = tmp_path / "out"
    run_segment_job([str(tmp_path / "tif")], out, model=threshold_model(), progress=False)
    again = discover_inputs([str(OutputFolder(out).masks)])
    assert [r.pixel_size_um for r in again] == pytest.approx([0.5])


# --------------------------------------------------------------------------- modality


def test_modality_of_fluorescence_brightfield_and_stained_images(dsb_root, monuseg_root):
    fluorescence, _ = synthetic_nuclei((128, 128), seed=2)
    assert classify_modality(fluorescence).modality == "fluorescence"
    assert classify_modality(np.stack([fluorescence] * 3, axis=-1)).modality == "fluorescence"  # grey stored as RGB
    composite = np.zeros((128, 128, 3), np.uint8)
    composite[..., 2] = fluorescence  # a DAPI channel shown blue: coloured, but a dark background
    assert classify_modality(composite).modality == "fluorescence"
    brightfield, _ = synthetic_nuclei((128, 128), seed=2, brightfield=True)
    assert classify_modality(brightfield).modality == "brightfield"
    assert classify_modality(np.stack([brightfield] * 3, axis=-1).astype(np.uint16) * 16).modality == "brightfield"  # 12 bits in 16

    grey_ids = [s for s in discover_annotated([dsb_root])[:40]]
    for source in grey_ids:
        image = read_image_file(source.image_path)
        if np.ptp(image[..., :3].astype(int), axis=2).max() == 0 and np.median(image[..., :3]) < 60:  # grey fluorescence
            assert classify_modality(image).modality == "fluorescence", source.image_id

    for source in discover_annotated([monuseg_root])[::3]:
        annotated = load_annotated(source)
        tile = annotated.image[..., :3]
        evidence = classify_modality(tile)
        assert (evidence.modality, evidence.kind) == ("brightfield", "stained"), source.image_id
        # a slide: the tile on a wide white background
        slide = np.full((3000, 3000, 3), 242, np.uint8)
        slide[1000:2000, 1000:2000] = tile
        assert classify_modality(slide).kind == "stained"
        # the densest 256 x 256 crop: nuclei everywhere, no white background
        fraction = np.lib.stride_tricks.sliding_window_view(annotated.labels > 0, (256, 256))[::64, ::64].mean(axis=(2, 3))
        y, x = np.unravel_index(int(np.argmax(fraction)), fraction.shape)
        crop = tile[64 * y : 64 * y + 256, 64 * x : 64 * x + 256]
        evidence = classify_modality(crop)  # dense tissue: brightfield all the same
        assert (evidence.modality, evidence.kind) == ("brightfield", "stained"), (source.image_id, fraction.max())
        assert classify_modality(crop, channel=0).kind != "stained"  # one channel picked: no colour to read


# --------------------------------------------------------------------------- haematoxylin input


def test_haematoxylin_density_follows_colour_deconvolution_and_normalises_bit_for_bit(monuseg_root):
    from skimage.color import rgb2hed

    image = read_image_file(next(iter(discover_annotated([monuseg_root]))).image_path)[:300, :300]
    density = haematoxylin_density(image)
    assert density.shape == image.shape[:2] and density.dtype == np.float32
    assert np.corrcoef(density.ravel(), rgb2hed(image[..., :3])[..., 0].ravel())[0, 1] > 0.98
    stats = compute_stats(density, invert="never", input="haematoxylin")
    np.testing.assert_array_equal(normalise_pixels(image, stats), apply_stats(network_channel(image, None, "haematoxylin"), stats))
    np.testing.assert_array_equal(network_channel(image.astype(np.float32) / 255, None, "haematoxylin").shape, density.shape)
    # one channel: its optical density (dark = high)
    grey = np.array([[0, 255]], np.uint8)
    assert network_channel(grey, None, "haematoxylin")[0, 0] > network_channel(grey, None, "haematoxylin")[0, 1]


# --------------------------------------------------------------------------- scale


def test_resample_scale_from_pixel_sizes_and_diameters():
    model = {"nucleus_diameter_px": 20.0, "pixel_size_um": 0.25}
    assert resample_scale(model, 0.5) == 2.0
    assert resample_scale(model, 0.25) == 1.0
    assert resample_scale(model, 0.255) == 1.0  # within the tolerance: not resampled
    assert resample_scale(model, None) == 1.0
    assert resample_scale(model, 0.5, diameter_px=40.0) == 0.5  # the diameter wins
    assert resample_scale({"nucleus_diameter_px": 20.0, "pixel_size_um": None}, 0.5) == 1.0
    assert resample_scale(model, 100.0) == 1.0  # beyond 8x: wrong metadata, not resampled
    assert check_diameter("auto") == "auto" and check_diameter("12.5") == 12.5
    with pytest.raises(UsageError):
        check_diameter("-3")


@pytest.mark.parametrize("scale", [2.0, 0.5, 1.37])
def test_to_and_from_network_scale_round_trip_a_ramp_exactly(scale):
    yy, xx = np.mgrid[0:90, 0:110].astype(np.float32)
    ramp = yy * 0.3 + xx * 0.7
    network = to_network_scale(ramp, scale)
    assert network.shape == (round(90 * scale), round(110 * scale))
    box = (7, 61, 13, 97)
    y0, y1, x0, x1 = network_box(box, scale, network.shape)
    back = from_network_scale(network[None, y0:y1, x0:x1], scale, (y0, x0), box)[0]
    np.testing.assert_allclose(back, ramp[7:61, 13:97], atol=1e-3)
    half = from_network_scale(network[None, y0:y1, x0:x1].astype(np.float16), scale, (y0, x0), box)
    assert half.dtype == np.float16


@pytest.mark.parametrize("pixel_size", [1.0, 0.25])
def test_an_image_resampled_for_its_model_keeps_its_nuclei_at_native_resolution(tmp_path, pixel_size):
    """The threshold oracle sees nuclei alike at any scale: labels made at the image's own pixels
    after a round trip through the model's scale (2x up, 2x down) match those of no resampling."""
    image, _ = synthetic_nuclei((300, 260), n_nuclei=18, radius=(9, 14), seed=4)
    model = threshold_model()
    model.config = replace(model.config, scale={"nucleus_diameter_px": 20.0, "pixel_size_um": 0.5})
    scale = resample_scale(model.config.scale, pixel_size)
    assert scale == pixel_size / 0.5
    native = segment_image(image, model)
    resampled = segment_image(image, model, scale=scale)
    assert resampled.shape == image.shape
    scores = image_scores(native, resampled)
    # at half the resolution two nuclei that touch may merge (one of 14 here), and the oracle's 3 x 3
    # smoothing covers 6 x 6 of the image's pixels: outlines move, nuclei stay
    minimum = 0.95 if scale > 1 else 0.75
    assert abs(scores["n_pred"] - scores["n_true"]) <= 0.1 * scores["n_true"] and scores["ap50"] >= 0.9 and scores["map"] > minimum
    # the whole pipeline, blocks and all: the image with its pixel size in an OME-TIFF
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "cells.ome.tif", image, metadata={"axes": "YX", "PhysicalSizeX": pixel_size, "PhysicalSizeY": pixel_size})
    out = tmp_path / "out"
    summary = run_segment_job([str(tmp_path / "in")], out, model=model, settings=SegmentSettings(block_size=128, block_margin=48), progress=False)
    assert summary.exit_code == 0
    images = pd.read_parquet(OutputFolder(out).images)
    assert images.scale.tolist() == [scale] and images.pixel_size_um.tolist() == [pixel_size]
    labels = zarr.open_group(str(OutputFolder(out).masks), mode="r")[images.store_path[0]][label_path(0)][:]
    assert labels.shape == image.shape
    blocks = image_scores(resampled, labels)  # in blocks of 128 as in one piece
    assert blocks["ap50"] >= 0.9 and blocks["map"] > 0.85


def test_micrometre_columns_and_physical_ngff_scales(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    image, _ = synthetic_nuclei((128, 128), seed=5)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "known.ome.tif", image, metadata={"axes": "YX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65})
    tifffile.imwrite(tmp_path / "in" / "unknown.tif", image)
    out = tmp_path / "out"
    run_segment_job([str(tmp_path / "in")], out, model=threshold_model(), progress=False)
    nuclei = pd.read_parquet(OutputFolder(out).nuclei)
    known, unknown = nuclei[nuclei.image_id == "known"], nuclei[nuclei.image_id == "unknown"]
    assert len(known) > 5 and len(unknown) == len(known)
    np.testing.assert_allclose(known.area_um2, known.area * 0.65**2)
    np.testing.assert_allclose(known.perimeter_um, known.perimeter * 0.65)
    np.testing.assert_allclose(known[["centroid_y_um", "centroid_x_um"]], known[["centroid_y", "centroid_x"]] * 0.65)
    assert unknown[["area_um2", "perimeter_um", "centroid_y_um", "centroid_x_um"]].isna().all().all()
    images = pd.read_parquet(OutputFolder(out).images).set_index("image_id")
    assert images.loc["known", "pixel_size_um"] == 0.65 and pd.isna(images.loc["unknown", "pixel_size_um"])
    run = json.loads(OutputFolder(out).run_json.read_text())
    assert run["scales"]["images_with_pixel_size"] == 1
    for name, unit, size in (("known", "micrometer", 0.65), ("unknown", "pixel", 1.0)):
        nodes = [n for n in Reader(parse_url(str(OutputFolder(out).masks / images.loc[name, "store_path"])))() if any(isinstance(s, Multiscales) for s in n.specs)]
        assert len(nodes) == 2
        for node in nodes:  # the image and its labels
            axes = [a for a in node.metadata["axes"] if a["type"] == "space"]
            assert [a["unit"] for a in axes] == [unit, unit]
            first = node.metadata["coordinateTransformations"][0][0]["scale"]
            assert first[-2:] == [size, size]


# --------------------------------------------------------------------------- choosing the model


def test_choose_routes_by_modality_and_scales_by_pixel_size(tmp_path):
    fluorescence, brightfield = threshold_model(), threshold_model()
    brightfield.config = replace(brightfield.config, name="stained-oracle", serves=["stained"], scale={"nucleus_diameter_px": 20.0, "pixel_size_um": 0.25})
    models = ModelSet({"default": fluorescence, "he": brightfield}, {"fluorescence": "default", "brightfield": "default", "stained": "he"})
    (tmp_path / "in").mkdir()
    grey, _ = synthetic_nuclei((96, 96), n_nuclei=8, seed=6)
    tifffile.imwrite(tmp_path / "in" / "grey.tif", grey)
    tissue = np.stack([255 - grey // 2, 200 - grey // 2, 230 - grey // 3], axis=-1).astype(np.uint8)  # purple nuclei on pink
    tifffile.imwrite(tmp_path / "in" / "tissue.ome.tif", tissue, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    records = {r.image_id: r for r in discover_inputs([str(tmp_path / "in")])}
    chosen = {name: choose(record, models) for name, record in records.items()}
    assert (chosen["grey"].modality, chosen["grey"].model, chosen["grey"].scale) == ("fluorescence", "default", 1.0)
    assert (chosen["tissue"].modality, chosen["tissue"].model, chosen["tissue"].scale) == ("brightfield", "he", 2.0)
    assert choose(records["tissue"], models, pixel_size=0.25).scale == 1.0  # --pixel-size wins over the file
    forced = ModelSet({"he": brightfield}, {})
    assert choose(records["grey"], forced).model == "he" and choose(records["grey"], forced).modality is None
    broken = replace(records["grey"], error="cannot read")
    assert choose(broken, models).model == "default"


def test_instance_sizes_follow_the_scale():
    params = InstanceParams(min_seed_size=4, min_size=20)
    assert params.at_scale(1.0) is params
    assert params.at_scale(2.0).min_size == 5 and params.at_scale(0.5).min_size == 80 and params.at_scale(4.0).min_seed_size == 1


def test_densest_window_finds_the_bright_corner():
    image = np.zeros((300, 400), np.float32)
    image[220:280, 330:390] = 1.0
    y0, y1, x0, x1 = densest_window(image, 100)
    assert (y1 - y0, x1 - x0) == (100, 100) and y0 <= 220 and y1 >= 280 and x0 <= 330 and x1 >= 390
    assert densest_window(image, 1000) == (0, 300, 0, 400)


def test_diameter_auto_finds_the_magnification(tmp_path):
    from nucleibatch.scale import median_diameter
    from nucleibatch.segment.array import estimate_diameter

    image, truth = synthetic_nuclei((256, 256), n_nuclei=25, radius=(6, 10), seed=8)
    true_diameter = median_diameter(np.bincount(truth.ravel())[1:])
    model = threshold_model()
    model.config = replace(model.config, scale={"nucleus_diameter_px": true_diameter, "pixel_size_um": None})
    assert estimate_diameter(image, model) == pytest.approx(true_diameter, rel=0.1)
    twice = np.kron(image, np.ones((2, 2), image.dtype))
    found = estimate_diameter(twice, model)
    assert found == pytest.approx(2 * true_diameter, rel=0.1)
    assert resample_scale(model.config.scale, diameter_px=found) == pytest.approx(0.5, rel=0.1)
    assert estimate_diameter(np.zeros((64, 64), np.uint8), model) is None  # nothing found: no estimate

    # segment --diameter auto: the scale recorded per image, the labels at the input's size
    (tmp_path / "in").mkdir()
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(twice).save(tmp_path / "in" / "twice.png")
    Image.fromarray(image).save(tmp_path / "in" / "native.png")
    out = tmp_path / "out"
    summary = run_segment_job([str(tmp_path / "in")], out, model=model, settings=SegmentSettings(diameter="auto"), progress=False)
    assert summary.exit_code == 0
    images = pd.read_parquet(OutputFolder(out).images).set_index("image_id")
    # auto pulls AUTO_PULL of the way (log scale) to the model's diameter: 0.5 ** AUTO_PULL for nuclei twice its size
    assert images.loc["twice", "scale"] == pytest.approx(0.5**AUTO_PULL, rel=0.1) and images.loc["native", "scale"] == pytest.approx(1.0, abs=0.1)
    run = json.loads(OutputFolder(out).run_json.read_text())
    assert run["diameter"] == "auto" and run["scales"]["min"] == images.loc["twice", "scale"]
    labels = zarr.open_group(str(OutputFolder(out).masks), mode="r")[images.loc["twice", "store_path"]][label_path(0)][:]
    assert labels.shape == twice.shape
    native = segment_image(image, model)
    assert image_scores(np.kron(native, np.ones((2, 2), native.dtype)), labels)["ap50"] > 0.9


def test_evaluate_prints_per_modality_figures_and_takes_segments_scale_options(dsb_root, monuseg_root, tmp_path, capsys):
    from nucleibatch.cli import main

    folder = tmp_path / "mixed"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    fluorescence = next(s for s in discover_annotated([dsb_root]) if classify_modality(read_image_file(s.image_path)).modality == "fluorescence")
    for source, name in ((fluorescence, "fluo"), (discover_annotated([monuseg_root])[0], "tissue")):
        annotated = load_annotated(source)
        image, labels = annotated.image[:256, :256, :3], annotated.labels[:256, :256]
        tifffile.imwrite(folder / "images" / f"{name}.tif", image, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
        tifffile.imwrite(folder / "labels" / f"{name}.tif", labels.astype(np.uint16))
    csv = tmp_path / "rows.csv"
    assert main(["evaluate", str(folder), "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 images") and re.search(r"fluorescence +1 images", out) and re.search(r"brightfield +1 images", out)
    rows = pd.read_csv(csv).set_index("image_id")
    assert rows.loc["tissue", "model"] == "he" and rows.loc["fluo", "model"] == "default"
    assert rows.loc["tissue", "pixel_size_um"] == 0.25 and rows.loc["tissue", "scale"] == 1.0
    assert main(["evaluate", str(folder), "--model", "he", "--pixel-size", "0.5", "--invert", "never", "--csv", str(csv)]) == 0
    rows = pd.read_csv(csv).set_index("image_id")
    assert set(rows.model) == {"he"} and rows.loc["tissue", "scale"] == 2.0
    assert main(["evaluate", str(folder), "--diameter", "-2"]) == 2


@pytest.mark.slow
def test_a_mixed_archive_goes_to_the_shipped_models_alike_on_every_engine(dsb_root, monuseg_root, tmp_path):
    """Without --model: fluorescence fields to `default`, stained tissue (at 20x, resampled 2x for
    `he`) to `he`; the Dask engine runs each model's images and writes what the local one does."""
    from tests.helpers.outputs import assert_same_masks_and_tables

    folder = tmp_path / "in"
    folder.mkdir()
    fluorescence = [s for s in discover_annotated([dsb_root]) if classify_modality(read_image_file(s.image_path)).modality == "fluorescence"][:2]
    for source in fluorescence:
        Image = pytest.importorskip("PIL.Image")
        Image.fromarray(read_image_file(source.image_path)).save(folder / f"{source.image_id[:8]}.png")
    tile = load_annotated(discover_annotated([monuseg_root])[0]).image[:400, :400, :3]
    tifffile.imwrite(folder / "tissue20x.ome.tif", tile[::2, ::2], photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    local = run_segment_job([str(folder)], tmp_path / "local", device="cpu", precision="float32", progress=False)
    assert local.exit_code == 0
    images = pd.read_parquet(OutputFolder(tmp_path / "local").images).set_index("image_id")
    assert images.loc["tissue20x", ["modality", "model", "scale"]].tolist() == ["brightfield", "he", 2.0]
    assert set(images.drop(index="tissue20x").model) == {"default"} and set(images.drop(index="tissue20x").modality) == {"fluorescence"}
    assert (images.n_nuclei > 0).all()
    run = json.loads(OutputFolder(tmp_path / "local").run_json.read_text())
    assert run["model"]["name"] == "auto" and {m["name"]: m["images"] for m in run["models"]} == {"default": 2, "he": 1}
    assert {m["name"]: m["licence"] for m in run["models"]} == {"default": "CC0-1.0", "he": "CC-BY-NC-SA-4.0"}
    dask = run_segment_job([str(folder)], tmp_path / "dask", device="cpu", precision="float32", engine="dask", workers=1, progress=False)
    assert dask.exit_code == 0
    assert_same_masks_and_tables(tmp_path / "local", tmp_path / "dask")
    # the same OUT with one model forced is another run: refused, as other settings are
    with pytest.raises(UsageError, match="model_sha256"):
        run_segment_job([str(folder)], tmp_path / "local", model="default", device="cpu", precision="float32", progress=False)


def test_an_image_that_cannot_be_read_while_choosing_fails_alone(tmp_path):
    from nucleibatch.io.location import to_location

    fluorescence, tissue = threshold_model(), threshold_model()
    tissue.config = replace(tissue.config, serves=["stained"])
    models = ModelSet({"default": fluorescence, "he": tissue}, {"fluorescence": "default", "brightfield": "default", "stained": "he"})
    (tmp_path / "in").mkdir()
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(synthetic_nuclei((96, 96), n_nuclei=8, seed=9)[0]).save(tmp_path / "in" / "good.png")
    data = (tmp_path / "in" / "good.png").read_bytes()
    (tmp_path / "in" / "cut.png").write_bytes(data[: len(data) // 2])  # its header reads, its pixels do not
    records = {r.image_id: r for r in discover_inputs([str(tmp_path / "in")])}
    assert records["cut"].error is None and to_location(records["cut"].path).exists()
    assert choose(records["cut"], models).model == "default"
    summary = run_segment_job([str(tmp_path / "in")], tmp_path / "out", model=fluorescence, progress=False)
    assert (summary.n_ok, summary.n_failed) == (1, 1)
    images = pd.read_parquet(OutputFolder(tmp_path / "out").images).set_index("image_id")
    assert images.loc["cut", "status"] == "failed" and images.loc["cut", "error"]


def test_a_whole_number_diameter_and_smaller_blocks_for_enlarged_images(tmp_path):
    from nucleibatch.segment.plan import block_size_at

    image, _ = synthetic_nuclei((200, 200), n_nuclei=12, radius=(8, 12), seed=10)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "cells.tif", image)
    model = threshold_model()
    model.config = replace(model.config, scale={"nucleus_diameter_px": 40.0, "pixel_size_um": None})
    run_segment_job([str(tmp_path / "in")], tmp_path / "out", model=model, settings=SegmentSettings(diameter=20), progress=False)
    assert pd.read_parquet(OutputFolder(tmp_path / "out").images).scale.tolist() == [2.0]
    assert [block_size_at(2048, s, 128) for s in (0.5, 1.0, 1.02, 1.37, 2.0, 3.0, 8.0)] == [2048, 2048, 1024, 1024, 1024, 512, 256]
    assert block_size_at(256, 8.0, 128) == 256 and block_size_at(2048, 8.0, 600) == 1024  # stays above the margin


def test_an_out_written_before_the_micrometre_columns_is_refused_with_the_reason(tmp_path):
    image, _ = synthetic_nuclei((96, 96), n_nuclei=8, seed=11)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "cells.tif", image)
    out = tmp_path / "out"
    run_segment_job([str(tmp_path / "in")], out, model=threshold_model(), progress=False)
    settings = OutputFolder(out).settings
    recorded = json.loads(settings.read_text())
    del recorded["tables"]  # as an older nucleibatch recorded it
    settings.write_text(json.dumps(recorded))
    with pytest.raises(UsageError, match="older nucleibatch.*--overwrite"):
        run_segment_job([str(tmp_path / "in")], out, model=threshold_model(), progress=False)
    assert run_segment_job([str(tmp_path / "in")], out, model=threshold_model(), overwrite=True, progress=False).n_ok == 1
