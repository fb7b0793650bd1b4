"""Where the repository, its example images and the test data are."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the 5 real DSB images shipped with the repository (examples/dsb_demo/<id>/images/<id>.png)
DEMO = REPO / "examples" / "dsb_demo"
# the real annotated data beside the repository (../shared/data); CI lays it there too
SHARED_DATA = REPO.parent / "shared" / "data"
DSB_DATA = SHARED_DATA / "dsb2018" / "stage1_train"
MONUSEG_DATA = SHARED_DATA / "monuseg2018_train"
# small generated data in the DSB and MoNuSeg layouts, committed (scripts/make_test_data.py)
SMALL_DATA = REPO / "tests" / "data"
SMALL_DSB_DATA = SMALL_DATA / "dsb"
SMALL_MONUSEG_DATA = SMALL_DATA / "monuseg"
