"""The names of OUT's files on disk: the one test that spells them.

The format on disk is the contract (README "Look at the results", ../shared/DESIGN.md section 3,
docs/inputs.md for the state folder): users' scripts open these paths, and an OUT written by
an earlier version must still resume. So this test pins OutputFolder's names to the
documented literals; every other test takes them from nucleibatch/output/folder.py.
"""

from __future__ import annotations

from pathlib import Path

from nucleibatch.output import folder
from nucleibatch.output.folder import OutputFolder, label_path
from tests.helpers.paths import REPO

DESIGN = REPO.parent / "shared" / "DESIGN.md"


def test_output_folder_names_are_the_documented_ones():
    out = OutputFolder("/data/out")
    assert out.masks == Path("/data/out/masks.zarr")
    assert out.nuclei == Path("/data/out/nuclei.parquet")
    assert out.nuclei_part("plate__A01") == Path("/data/out/nuclei.parquet/plate__A01.parquet")
    assert out.images == Path("/data/out/images.parquet")
    assert out.run_json == Path("/data/out/run.json")
    assert out.report == Path("/data/out/report.html")
    assert out.exports == Path("/data/out/export") and out.export("geojson") == Path("/data/out/export/geojson")
    assert out.image_group("plateA/B/2/0") == Path("/data/out/masks.zarr/plateA/B/2/0")
    assert label_path(0) == "labels/nuclei/0" and label_path(1, "img") == "img/labels/nuclei/1"
    assert (folder.LABELS_GROUP, folder.LABEL_NAME) == ("labels", "nuclei")
    # the run's own state
    assert out.state == Path("/data/out/.nucleibatch")
    assert out.lock == Path("/data/out/.nucleibatch/lock")
    assert out.settings == Path("/data/out/.nucleibatch/settings.json")
    assert out.overwrite_marker == Path("/data/out/.nucleibatch/overwriting")
    assert out.placement == Path("/data/out/.nucleibatch/placement.jsonl")
    assert out.record("field03") == Path("/data/out/.nucleibatch/records/field03.json")
    assert out.checkpoints("field03") == Path("/data/out/.nucleibatch/blocks/field03")
    assert set(folder.OUTPUT_NAMES) == {"masks.zarr", "nuclei.parquet", "images.parquet", "run.json", "report.html", ".nucleibatch"}
    assert folder.OUTPUT_FOLDERS == {"masks.zarr", "nuclei.parquet", "export"}


def test_the_documents_name_the_same_paths():
    readme = (REPO / "README.md").read_text()
    for name in ("masks.zarr", "nuclei.parquet/", "images.parquet", "run.json", "report.html", "export/<format>/"):
        assert f"`OUT/{name}" in readme, name
    assert "<store_path>/labels/nuclei" in readme
    assert "`.nucleibatch/`" in (REPO / "docs" / "inputs.md").read_text()
    design = DESIGN.read_text()
    for name in ("masks.zarr", "nuclei.parquet", "images.parquet", "run.json"):
        assert f"`OUT/{name}`" in design, name
    assert "`labels/nuclei`" in design
