"""tests/data is what scripts/make_test_data.py writes: the committed files are the generator's."""

from __future__ import annotations

import runpy

import numpy as np
from PIL import Image

from tests.helpers.paths import REPO, SMALL_DATA


def test_the_committed_small_data_is_what_the_generator_writes(tmp_path):
    generator = runpy.run_path(str(REPO / "scripts" / "make_test_data.py"))
    written = generator["make_test_data"](tmp_path)
    committed = sorted(p for name in ("dsb", "monuseg") for p in (SMALL_DATA / name).rglob("*") if p.is_file())
    assert [p.relative_to(tmp_path) for p in written] == [p.relative_to(SMALL_DATA) for p in committed]
    for new, old in zip(written, committed, strict=True):
        # pixels, not bytes: another zlib may compress the same pixels differently
        with Image.open(new) as a, Image.open(old) as b:
            assert a.mode == b.mode, old
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(old))
    assert sum(p.stat().st_size for p in committed) < 1_000_000
