"""Multi-channel inputs (issue 23): per-channel means, ``touches_border``, ``--channel NAME``, and
a nuclei table mixing grey and multi-channel images.

Every check compares OUT with a hand computation over the label image that OUT itself holds
(numpy over ``labels == label``), on small OME-TIFF / OME-Zarr / PNG files written with the
libraries users use (tifffile, ome-zarr-py, PIL).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
import zarr

from nucleibatch.channels import intensity_suffixes, parse_channel, resolve_channel, sanitise
from nucleibatch.cli import main
from nucleibatch.errors import ImageReadError, UsageError
from nucleibatch.io.discover import discover_inputs
from nucleibatch.output.folder import OutputFolder, label_path
from nucleibatch.output.store import label_array
from nucleibatch.output.tables import SCHEMA_PART
from nucleibatch.segment import stitch
from nucleibatch.segment.job import run_segment_job
from nucleibatch.segment.plan import ImagePlan
from nucleibatch.segment.settings import SegmentSettings
from nucleibatch.synthetic import synthetic_nuclei, threshold_model
from tests.helpers import input_files as files

NAMES = ("DAPI", "GFP", "RFP")
SHAPE = (320, 288)


def three_channel_image(seed: int = 0) -> np.ndarray:
    """``(3, H, W)`` uint16 CYX: nuclei in DAPI (channel 0), GFP and RFP random counts over the
    whole field (so that a nucleus's GFP/RFP mean depends on exactly which pixels it has).
    Nuclei are dense and touch the edges and each other (the blocks' seams cross many)."""
    dapi, _ = synthetic_nuclei(SHAPE, n_nuclei=70, radius=(7.0, 15.0), seed=seed, dtype=np.uint16)
    rng = np.random.default_rng(seed + 1)
    gfp = rng.integers(0, 4000, SHAPE, dtype=np.uint16)
    rfp = (rng.integers(0, 60000, SHAPE)).astype(np.uint16)
    return np.stack([dapi, gfp, rfp])


def write_named_ome_tiff(path, data: np.ndarray, names=NAMES) -> None:
    tifffile.imwrite(path, data, ome=True, photometric="minisblack", metadata={"axes": "CYX", "Channel": {"Name": list(names)}})


def hand_means(labels: np.ndarray, channel: np.ndarray) -> dict[int, float]:
    """``{label: mean of channel over its pixels}`` by numpy, one nucleus at a time (float64)."""
    return {int(v): float(channel[labels == v].astype(np.float64).mean()) for v in np.unique(labels) if v}


def hand_touches_border(labels: np.ndarray) -> dict[int, bool]:
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return {int(v): bool(v in edge) for v in np.unique(labels) if v}


def stored_labels(out, images: pd.DataFrame, image_id: str) -> np.ndarray:
    store_path = images.set_index("image_id").store_path[image_id]
    return zarr.open_group(str(OutputFolder(out).masks), mode="r")[store_path][label_path(0)][:]


@pytest.fixture(scope="module")
def channel_run(tmp_path_factory):
    """A 3-channel named OME-TIFF, a grey PNG and an unnamed 2-channel OME-Zarr, segmented in
    blocks of 128 (seams every 128 px) with the nuclear stain in channel 0; seam re-measuring
    counted."""
    root = tmp_path_factory.mktemp("channels")
    (root / "in").mkdir()
    data = three_channel_image()
    write_named_ome_tiff(root / "in" / "stack.ome.tif", data)
    grey, _ = synthetic_nuclei((96, 112), n_nuclei=8, seed=3)
    files.write_plain(root / "in" / "grey.png", grey)
    two, _ = synthetic_nuclei((96, 96), n_nuclei=8, seed=4, dtype=np.uint16)
    files.write_ome_zarr(root / "in" / "two.zarr", np.stack([two, two // 2 + 7]), "cyx", n_levels=1)
    remeasured: list[int] = []
    original_remeasure, original_paint = stitch.remeasure, stitch.paint_block

    def counting(plan, source, image_group, columns, global_ids, settings):
        remeasured.extend(global_ids)
        return original_remeasure(plan, source, image_group, columns, global_ids, settings)

    def seams_as_conflicts(plan, block, results, offsets, image_group):
        # blocks rarely disagree about a nucleus (only where a model's context exceeds the halo), so
        # every nucleus painted across this core's seams is reported as one that lost pixels there:
        # the run then re-measures them from the final labels, as it does after a real conflict
        lost = original_paint(plan, block, results, offsets, image_group)
        cy0, cy1, cx0, cx1 = block.core
        core = np.asarray(label_array(image_group)[cy0:cy1, cx0:cx1])
        seams = [core[0], core[-1], core[:, 0], core[:, -1]]
        inner = [edge for edge, at_image_edge in zip(seams, (cy0 == 0, cy1 == plan.shape[0], cx0 == 0, cx1 == plan.shape[1]), strict=True) if not at_image_edge]
        crossing = {int(v) for edge in inner for v in np.unique(edge) if v}
        return {**dict.fromkeys(crossing, 0), **lost}

    mp = pytest.MonkeyPatch()
    mp.setattr(stitch, "remeasure", counting)
    mp.setattr(stitch, "paint_block", seams_as_conflicts)
    try:
        out = root / "out"
        summary = run_segment_job([str(root / "in")], out, model=threshold_model(), settings=SegmentSettings(block_size=128, block_margin=48, channel=0), progress=False)
    finally:
        mp.undo()
    return root, out, data, summary, remeasured


def test_per_channel_means_match_a_hand_computation_over_every_nucleus(channel_run):
    _, out, data, summary, remeasured = channel_run
    assert summary.exit_code == 0
    images = pd.read_parquet(OutputFolder(out).images)
    nuclei = pd.read_parquet(OutputFolder(out).nuclei)
    labels = stored_labels(out, images, "stack")
    mine = nuclei[nuclei.image_id == "stack"].set_index("label")
    assert sorted(mine.index) == sorted(int(v) for v in np.unique(labels) if v) and len(mine) > 30
    for c, name in enumerate(NAMES):
        expected = hand_means(labels, data[c])
        got = mine[f"mean_intensity_{name}"]
        np.testing.assert_allclose(got.loc[list(expected)].to_numpy(), list(expected.values()), rtol=1e-12, atol=0)
    # the nuclear channel is the one mean_intensity measures
    np.testing.assert_allclose(mine.mean_intensity, mine.mean_intensity_DAPI, rtol=1e-6)
    # nuclei across the 128 px seams (owned by one block, read whole) are among those compared
    crossing = ((mine.bbox_min_y < 128) & (mine.bbox_max_y > 128)) | ((mine.bbox_min_x < 128) & (mine.bbox_max_x > 128))
    assert crossing.sum() >= 3
    # ... and they went through the re-measuring of seam nuclei (which the hand computation checks too)
    assert len(set(remeasured) & set(mine.index[crossing])) >= 3


def test_remeasure_gives_exact_channel_means(channel_run):
    """A nucleus re-measured from the final labels (what a seam overlap triggers) gets the
    per-channel means of exactly its final pixels: sum over count of the raw values."""
    root, out, data, _, _ = channel_run
    from nucleibatch.io.readers import open_source
    from nucleibatch.output.store import open_root

    record = next(r for r in discover_inputs([str(root / "in" / "stack.ome.tif")]))
    images = pd.read_parquet(OutputFolder(out).images)
    labels = stored_labels(out, images, "stack")
    nuclei = pd.read_parquet(OutputFolder(out).nuclei).query("image_id == 'stack'").reset_index(drop=True)
    columns = {name: nuclei[name].to_numpy().copy() for name in nuclei.columns if name != "image_id"}
    for name in ("mean_intensity_GFP", "mean_intensity_RFP", "mean_intensity_DAPI"):
        columns[name][:] = -1.0  # stale values the re-measure must replace
    chosen = [int(v) for v in columns["label"][:5]]
    source = open_source(record)
    try:
        plan = ImagePlan(record, images.store_path[images.image_id == "stack"].iloc[0], SHAPE, 3, np.dtype(np.uint16), None, [], channel=0)
        group = open_root(OutputFolder(out).masks, mode="r")[plan.name]
        stitch.remeasure(plan, source, group, columns, chosen, SegmentSettings())
    finally:
        source.close()
    for c, name in enumerate(NAMES):
        expected = hand_means(labels, data[c])
        for row, label in enumerate(columns["label"][:5]):
            assert columns[f"mean_intensity_{name}"][row] == pytest.approx(expected[int(label)], rel=1e-12)


def test_touches_border_matches_the_labels_edges(channel_run):
    _, out, _, _, _ = channel_run
    images = pd.read_parquet(OutputFolder(out).images)
    nuclei = pd.read_parquet(OutputFolder(out).nuclei)
    assert nuclei.touches_border.dtype == bool
    for image_id in images.image_id:
        labels = stored_labels(out, images, image_id)
        mine = nuclei[nuclei.image_id == image_id].set_index("label").touches_border
        expected = hand_touches_border(labels)
        assert mine.to_dict() == expected
    assert nuclei.touches_border.any() and not nuclei.touches_border.all()


def test_mixed_grey_and_multichannel_run_reads_as_one_table(channel_run):
    _, out, _, _, _ = channel_run
    nuclei = pd.read_parquet(OutputFolder(out).nuclei)
    expected = {"mean_intensity_DAPI", "mean_intensity_GFP", "mean_intensity_RFP", "mean_intensity_c0", "mean_intensity_c1"}
    assert expected <= set(nuclei.columns)
    by_image = nuclei.groupby("image_id")
    assert set(by_image.groups) == {"grey", "stack", "two"}
    # a column an image does not have is null for its rows, and only for them
    assert nuclei.loc[nuclei.image_id == "grey", sorted(expected)].isna().all().all()
    assert nuclei.loc[nuclei.image_id == "two", ["mean_intensity_c0", "mean_intensity_c1"]].notna().all().all()
    assert nuclei.loc[nuclei.image_id == "two", "mean_intensity_GFP"].isna().all()
    assert nuclei.loc[nuclei.image_id == "stack", "mean_intensity_RFP"].notna().all()
    # the grey image's part has no channel columns of its own: the schema part unites them
    assert "mean_intensity_GFP" not in pq.read_schema(OutputFolder(out).nuclei_part(pd.read_parquet(OutputFolder(out).images).set_index('image_id').store_path['grey'])).names
    assert (OutputFolder(out).nuclei / SCHEMA_PART).is_file()
    assert len(pd.read_parquet(OutputFolder(out).nuclei / SCHEMA_PART)) == 0
    # the image copy keeps the names, for napari and for `--channel NAME` on this OUT
    store_path = pd.read_parquet(OutputFolder(out).images).set_index("image_id").store_path["stack"]
    attrs = zarr.open_group(str(OutputFolder(out).masks), mode="r")[store_path].attrs.asdict()
    assert [c["label"] for c in attrs["ome"]["omero"]["channels"]] == list(NAMES)


def test_channel_by_name_picks_the_same_channel_as_its_index(tmp_path):
    (tmp_path / "in").mkdir()
    data = three_channel_image(seed=5)
    data = data[[1, 0, 2]]  # the nuclei in channel 1
    write_named_ome_tiff(tmp_path / "in" / "s.ome.tif", data, ("GFP", "DAPI", "RFP"))
    model = threshold_model()
    for channel, name in ((1, "index"), ("dapi", "name")):  # case-insensitive: the one match
        run_segment_job([str(tmp_path / "in")], tmp_path / name, model=model, settings=SegmentSettings(channel=channel), progress=False)
    by_index = pd.read_parquet(OutputFolder(tmp_path / "index").nuclei)
    by_name = pd.read_parquet(OutputFolder(tmp_path / "name").nuclei)
    assert len(by_index) > 20
    pd.testing.assert_frame_equal(by_index, by_name)
    # evaluate on that OUT (read back as annotated data: names from its image copy) resolves alike
    from nucleibatch.evaluate import evaluate_model

    scores = [evaluate_model(model, [tmp_path / "index"], channel=channel)[0]["map"] for channel in (1, "DAPI")]
    assert scores[0] == scores[1]
    with pytest.raises(UsageError, match=r"--channel 'CFP'.*GFP \(0\), DAPI \(1\), RFP \(2\)"):
        evaluate_model(model, [tmp_path / "index"], channel="CFP")
    # and not the mean of the colours: another channel gives other nuclei
    run_segment_job([str(tmp_path / "in")], tmp_path / "rfp", model=model, settings=SegmentSettings(channel="RFP"), progress=False)
    assert len(pd.read_parquet(OutputFolder(tmp_path / "rfp").nuclei)) != len(by_index)


def test_unknown_channel_name(tmp_path, capsys, tiny_bundle):
    (tmp_path / "in").mkdir()
    write_named_ome_tiff(tmp_path / "in" / "named.ome.tif", three_channel_image()[:, :96, :96])
    files.write_ome_zarr(tmp_path / "in" / "other.zarr", three_channel_image()[:2, :96, :96], "cyx", n_levels=1)
    # a name some inputs have: the others fail, their row naming the channels they do have
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "in"), "-o", str(out), "--channel", "GFP", "--model", str(tiny_bundle), "--device", "cpu"]) == 3
    images = pd.read_parquet(OutputFolder(out).images).set_index("image_id")
    assert images.status["named"] == "ok"
    assert images.status["other"] == "failed"
    assert "--channel 'GFP'" in images.error["other"] and "2 unnamed channel(s)" in images.error["other"]
    # a name no input has: a usage error before anything is written
    capsys.readouterr()
    assert main(["segment", str(tmp_path / "in"), "-o", str(tmp_path / "typo"), "--channel", "GPF"]) == 2
    err = capsys.readouterr().err
    assert "'GPF'" in err and "DAPI, GFP, RFP" in err and "\n" not in err.strip()
    assert not OutputFolder(tmp_path / "typo").nuclei.exists()


def test_colour_images_get_no_channel_columns_and_names_are_sanitised(tmp_path):
    assert intensity_suffixes(3, "uint8", None) == ()  # RGB: one colour picture
    assert intensity_suffixes(4, "uint8", ["", "", "", ""]) == ()  # RGBA
    assert intensity_suffixes(3, "uint16", None) == ("c0", "c1", "c2")
    assert intensity_suffixes(3, "uint8", ["DAPI", "GFP", "RFP"]) == ("DAPI", "GFP", "RFP")  # named: marker channels
    assert intensity_suffixes(1, "uint16", ["DAPI"]) == ()
    assert intensity_suffixes(3, "uint16", ["Alexa Fluor 488", "", "H3K27me3 (Cy5)"]) == ("Alexa_Fluor_488", "c1", "H3K27me3_Cy5")
    assert intensity_suffixes(2, "uint16", ["GFP", "gfp?"]) == ("GFP", "gfp")
    assert intensity_suffixes(3, "uint16", ["A b", "A-b", "C"]) == ("A_b_c0", "A_b_c1", "C")
    assert sanitise("µ-tubulin/α") == "tubulin"
    assert parse_channel("2") == 2 and parse_channel("DAPI") == "DAPI" and parse_channel("-1") == -1
    assert resolve_channel("gfp", ("DAPI", "GFP"), 2) == 1
    with pytest.raises(ImageReadError, match=r"DAPI \(0\), GFP \(1\)"):
        resolve_channel("RFP", ("DAPI", "GFP"), 2)
    rgb = files.write_plain(tmp_path / "rgb.png", files.multichannel((48, 48), 3))
    record = discover_inputs([str(rgb)])[0]
    assert record.channels == 3 and record.channel_names is None
    with pytest.raises(UsageError, match="no input names its channels"):
        discover_inputs([str(rgb)], channel="DAPI")


def test_geojson_export_carries_each_images_own_channel_means(channel_run):
    import json

    _, out, _, _, _ = channel_run
    assert main(["export", str(out), "--format", "geojson"]) == 0
    exported = {p.name: json.loads(p.read_text()) for p in OutputFolder(out).export("geojson").rglob("*.geojson")}
    measured = {name: set(collection["features"][0]["properties"]["measurements"]) for name, collection in exported.items() if collection["features"]}
    stack = next(m for name, m in measured.items() if name.startswith("stack"))
    grey = next(m for name, m in measured.items() if name.startswith("grey"))
    assert {"mean_intensity_DAPI", "mean_intensity_GFP", "mean_intensity_RFP"} <= stack and "mean_intensity_c0" not in stack
    assert not any(name.startswith("mean_intensity_") for name in grey)


def test_measure_labels_per_channel_means_and_touches_border_on_a_small_array():
    from nucleibatch.measure import measure_labels, touches_border

    labels = np.zeros((6, 7), np.int32)
    labels[0:2, 1:3] = 1  # on the first row
    labels[3:5, 3:5] = 2  # inside
    labels[4:6, 6] = 3  # last row and column
    pixels = np.arange(6 * 7 * 2, dtype=np.float32).reshape(6, 7, 2)
    pixels[3, 3, 1] = np.nan  # left out of nucleus 2's mean in channel 1 only
    columns = measure_labels(labels, pixels[..., 0], channels=pixels, channel_columns=("mean_intensity_A", "mean_intensity_B"))
    for label in (1, 2, 3):
        for c, name in enumerate(("mean_intensity_A", "mean_intensity_B")):
            values = pixels[labels == label, c].astype(np.float64)
            assert columns[name][label - 1] == pytest.approx(values[np.isfinite(values)].mean())
    assert touches_border(columns, labels.shape).tolist() == [True, False, True]
    assert measure_labels(np.zeros((4, 4), np.int32), np.zeros((4, 4)), channels=np.zeros((4, 4, 2)), channel_columns=("a", "b"))["b"].dtype == np.float64
    with pytest.raises(ValueError, match=r"channels must be \(h, w, 2\)"):
        measure_labels(labels, pixels[..., 0], channels=pixels[..., :1], channel_columns=("a", "b"))
