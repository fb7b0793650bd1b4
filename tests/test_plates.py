"""Screens (issue 23): OME-Zarr plates in and out, the root of the masks store in OME-Zarr readers,
and ``--include`` for one-file-per-channel exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from nucleibatch.cli import main
from nucleibatch.output.folder import LABEL_NAME, LABELS, MASKS, OutputFolder
from nucleibatch.output.layout import OME_GROUP
from nucleibatch.output.store import store_name
from nucleibatch.segment.job import run_segment_job
from nucleibatch.segment.settings import SegmentSettings
from nucleibatch.synthetic import threshold_model
from tests.helpers import input_files as files

SETTINGS = SegmentSettings(block_size=256, block_margin=64)
# the input plate: 2 rows x 2 columns, wells B/2 and C/3 filled (the others empty), 2 fields each
WELLS = {"B/2": ["0", "1"], "C/3": ["0", "1"]}


def discs(seed: int, shape: tuple[int, int] = (64, 64), n: int = 3) -> np.ndarray:
    """A dark uint8 field with ``n`` bright, well separated discs (radius 5): nuclei the threshold
    model finds exactly."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, 10, np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    centres = [(14, 14), (14, 46), (46, 30), (48, 52)]
    for cy, cx in [centres[i] for i in rng.permutation(len(centres))[:n]]:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = 200
    return image


def write_plate(path: Path) -> dict[str, int]:
    """An HCS OME-Zarr plate written by ome-zarr-py (NGFF 0.5, zarr v3); returns the number of
    nuclei drawn in each field, by ``well/field``."""
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    root = zarr.open_group(parse_url(str(path), mode="w").store, mode="w")
    write_plate_metadata(root, ["A", "B", "C"], ["1", "2", "3"], list(WELLS), name="screen 1")
    drawn = {}
    for number, (well, fields) in enumerate(WELLS.items()):
        row, column = well.split("/")
        well_group = root.require_group(row).require_group(column)
        write_well_metadata(well_group, fields)
        for field in fields:
            n = 2 + (number + int(field)) % 3
            write_image(discs(number * 10 + int(field), n=n), well_group.require_group(field), axes="yx", scale_factors=[])
            drawn[f"{well}/{field}"] = n
    return drawn


@pytest.fixture(scope="module")
def plate_run(tmp_path_factory):
    """One segment run of a plate input (shared by the plate tests: each reads its own part of OUT)."""
    tmp = tmp_path_factory.mktemp("plate")
    drawn = write_plate(tmp / "screen.zarr")
    summary = run_segment_job([str(tmp / "screen.zarr")], tmp / "out", model=threshold_model(), settings=SETTINGS, progress=False)
    assert summary.exit_code == 0
    return tmp, drawn


def test_a_plate_input_gives_a_plate_that_ome_zarr_py_reads_at_the_root(plate_run):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Plate, Reader

    tmp, drawn = plate_run
    masks = OutputFolder(tmp / "out").masks
    nodes = list(Reader(parse_url(str(masks)))())
    plate = nodes[0].first(Plate)
    assert plate is not None, f"the root of {MASKS} is not a plate"
    # the wells that hold fields, in the input's rows and columns
    assert plate.row_names == ["B", "C"] and plate.col_names == ["2", "3"]
    assert plate.well_paths == ["B/2", "C/3"]
    metadata = zarr.open_group(str(masks), mode="r").attrs["ome"]
    assert metadata["version"] == "0.5" and metadata["plate"]["field_count"] == 2 and metadata["plate"]["name"] == "screen"
    for well, fields in WELLS.items():
        well_attrs = zarr.open_group(str(masks / well), mode="r").attrs["ome"]
        assert [image["path"] for image in well_attrs["well"]["images"]] == fields
        for field in fields:
            # napari-ome-zarr's conventions: a multiscale image per field with its labels beside,
            # each label image an "image-label" multiscale pointing back at its image
            field_nodes = list(Reader(parse_url(str(masks / well / field)))())
            assert any(node.first(Multiscales) for node in field_nodes)
            labels = [node for node in field_nodes if node.first(Label)]
            assert len(labels) == 1 and labels[0].metadata["name"] == LABEL_NAME
            values = np.unique(np.asarray(labels[0].data[0]))
            assert len(values[values > 0]) == drawn[f"{well}/{field}"]
            label_attrs = zarr.open_group(str(masks / well / field / LABELS), mode="r").attrs["ome"]
            assert label_attrs["image-label"]["source"]["image"] == "../../"
    # the stitched plate view reads (every field has the same shape)
    assert nodes[0].data[0].shape[-2:] == (2 * 64, 2 * 64)


def test_images_table_places_each_field_and_store_paths_are_in_the_plate(plate_run):
    tmp, drawn = plate_run
    images = pd.read_parquet(OutputFolder(tmp / "out").images).set_index("image_id")
    assert len(images) == 4 and (images.status == "ok").all()
    for key, n in drawn.items():
        row = images.loc[f"screen/{key}"]
        well, field = key.rsplit("/", 1)
        assert (row.plate, row.well, row.field) == ("screen", well, field)
        assert row.store_path == key and row.n_nuclei == n
    nuclei = pd.read_parquet(OutputFolder(tmp / "out").nuclei)
    assert len(nuclei) == sum(drawn.values())
    run = json.loads(OutputFolder(tmp / "out").run_json.read_text())
    assert run["layout"] == "plate"


def test_verify_export_and_resume_of_a_plate_output(plate_run, capsys):
    tmp, drawn = plate_run
    out = tmp / "out"
    assert main(["verify", str(out)]) == 0
    assert main(["export", str(out), "--format", "png"]) == 0
    # export files stay flat (one folder), named after the image ids
    exported = sorted(p.name for p in OutputFolder(out).export("png").iterdir())
    assert exported == sorted(f"{store_name('screen/' + key)}.png" for key in drawn) and all(name.startswith("screen__") for name in exported)
    summary = run_segment_job([str(tmp / "screen.zarr")], out, model=threshold_model(), settings=SETTINGS, progress=False)
    assert summary.n_resumed == 4 and summary.n_ok == 4
    # the root is still the plate after a run that did nothing
    assert "plate" in zarr.open_group(str(OutputFolder(out).masks), mode="r").attrs["ome"]


def test_an_ordinary_image_added_to_a_plate_out_is_refused(plate_run, tmp_path):
    tmp, _ = plate_run
    files.write_plain(tmp_path / "extra.png", discs(5))
    with pytest.raises(Exception, match="holds the plate 'screen' at its root"):
        run_segment_job([str(tmp / "screen.zarr"), str(tmp_path / "extra.png")], tmp / "out", model=threshold_model(), settings=SETTINGS, progress=False)


def test_a_folder_of_images_and_a_plate_opens_at_the_root(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Plate, Reader

    folder = tmp_path / "in"
    write_plate(folder / "screen.zarr")
    files.write_plain(folder / "a.png", discs(1))
    files.write_plain(folder / "sub" / "b.png", discs(2))
    summary = run_segment_job([str(folder)], tmp_path / "out", model=threshold_model(), settings=SETTINGS, progress=False)
    assert summary.exit_code == 0 and summary.n_ok == 6
    masks = OutputFolder(tmp_path / "out").masks
    images = pd.read_parquet(OutputFolder(tmp_path / "out").images).set_index("image_id")
    # ordinary images keep their flat groups; the plate's fields go into its own plate group
    assert images.loc["a", "store_path"] == "a" and images.loc["sub/b", "store_path"].startswith("sub__b-")
    assert images.loc["screen/B/2/1", "store_path"] == "screen/B/2/1" and pd.isna(images.loc["a", "plate"])
    # the root: the bioformats2raw layout of NGFF 0.5, its OME group listing every image group
    root = parse_url(str(masks))
    assert root.root_attrs["bioformats2raw.layout"] == 3
    series = root.create(OME_GROUP).root_attrs["series"]
    assert sorted(series) == sorted(images.store_path)
    xml = (masks / OME_GROUP / "METADATA.ome.xml").read_text()
    assert all(f'ID="Image:{path}"' in xml for path in series)
    for path in series:  # each listed group opens in ome-zarr-py with its labels
        nodes = list(Reader(parse_url(str(masks / path)))())
        assert any(node.first(Multiscales) for node in nodes) and any(node.first(Label) for node in nodes)
    plate = list(Reader(parse_url(str(masks / "screen")))())[0].first(Plate)
    assert plate is not None and plate.well_paths == ["B/2", "C/3"]


def test_include_keeps_the_nuclear_channel_of_a_one_file_per_channel_export(tmp_path, capsys):
    export = tmp_path / "export"
    for well in ("A01", "A02"):
        for site in ("s1", "s2"):
            files.write_plain(export / f"{well}_{site}_w1.tif", discs(len(well + site)))
            files.write_plain(export / f"{well}_{site}_w2.tif", np.full((64, 64), 90, np.uint8))
    summary = run_segment_job([str(export)], tmp_path / "out", model=threshold_model(), settings=SETTINGS, progress=False, include=["*_w1.tif"])
    images = pd.read_parquet(OutputFolder(tmp_path / "out").images)
    assert sorted(images.image_id) == ["A01_s1_w1", "A01_s2_w1", "A02_s1_w1", "A02_s2_w1"] and summary.n_ok == 4
    assert json.loads(OutputFolder(tmp_path / "out").run_json.read_text())["include"] == ["*_w1.tif"]
    # a pattern that matches nothing: one line, exit 2, naming the pattern
    code = main(["segment", str(export), "-o", str(tmp_path / "none"), "--include", "*_w1.tif", "--include", "*_w3.tif", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "'*_w3.tif' matched none of the 8 files" in err[-1]


def test_an_out_from_before_plates_verifies_reports_and_resumes(tmp_path):
    """An OUT written before the plate columns and layouts (no `layout` setting, an images table
    and records without plate/well/field) keeps its groups and is read, checked and resumed."""
    import pyarrow.parquet as pq

    from nucleibatch.report import write_report

    folder = tmp_path / "in"
    files.write_plain(folder / "a.png", discs(1))
    files.write_plain(folder / "b.png", discs(2))
    out = tmp_path / "out"
    run_segment_job([str(folder)], out, model=threshold_model(), settings=SETTINGS, progress=False)
    state = OutputFolder(out)
    settings = json.loads(state.settings.read_text())
    del settings["layout"]
    state.settings.write_text(json.dumps(settings))
    for record in state.records.glob("*.json"):
        row = json.loads(record.read_text())
        record.write_text(json.dumps({k: v for k, v in row.items() if k not in ("plate", "well", "field")}))
    table = pq.read_table(OutputFolder(out).images)
    pq.write_table(table.drop(["plate", "well", "field"]), OutputFolder(out).images)
    assert main(["verify", str(out)]) == 0
    write_report(out)
    summary = run_segment_job([str(folder)], out, model=threshold_model(), settings=SETTINGS, progress=False)
    assert summary.n_resumed == 2 and summary.n_ok == 2
    images = pd.read_parquet(OutputFolder(out).images)
    assert list(images.store_path) == ["a", "b"] and images.plate.isna().all()  # the columns are there now, null
    assert zarr.open_group(str(OutputFolder(out).masks), mode="r").attrs["ome"]["bioformats2raw.layout"] == 3
