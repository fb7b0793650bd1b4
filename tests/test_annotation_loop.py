"""The README's annotation loop ("Correct and fine-tune"), run as written on a tiny input: segment,
the napari correction (its Python block, with a stand-in for napari that deletes a nucleus as a
user would), fine-tune on the corrected OUT, segment again with the fine-tuned bundle."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

from nucleibatch.output.folder import OutputFolder, label_path
from nucleibatch.synthetic import synthetic_nuclei
from tests.helpers.paths import REPO

SECTION = "## Correct and fine-tune"
# appended to the README's train line (argparse: the last value wins): the same loop, in seconds
# (test_annotated.py trains with these on the CPU too)
QUICK_TRAIN = "--epochs 1 --patches-per-epoch 4 --batch-size 2 --patch-size 64 --no-tune --overlay-every 0"


def readme_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of the fenced blocks of the README's loop section, in order."""
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + 1)
    return re.findall(r"```(bash|python)\n(.*?)```", text[start : end if end > 0 else None], re.S)


def commands(code: str) -> list[str]:
    """The command lines of a bash block (continuations joined, comments dropped)."""
    joined = code.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


class FakeNapari(types.ModuleType):
    """What the README's Python block uses of napari; ``run()`` plays the user: it deletes the
    largest nucleus of the labels layer (in place, as napari's eraser does)."""

    def __init__(self) -> None:
        super().__init__("napari")
        self.deleted: int | None = None
        self.images: list[np.ndarray] = []
        fake = self

        class Layer:
            def __init__(self, data: np.ndarray) -> None:
                self.data = data

        class Viewer:
            def __init__(self) -> None:
                self.labels: list[Layer] = []

            def add_image(self, data, channel_axis=None, **_):
                fake.images.append(np.asarray(data))
                return [Layer(d) for d in np.moveaxis(np.asarray(data), channel_axis, 0)] if channel_axis is not None else Layer(data)

            def add_labels(self, data, name=None, **_):
                layer = Layer(np.asarray(data))
                fake.viewer_labels.append(layer)
                return layer

        self.viewer_labels: list[Layer] = []
        self.Viewer = Viewer

    def run(self) -> None:
        (layer,) = self.viewer_labels
        values, sizes = np.unique(layer.data[layer.data > 0], return_counts=True)
        assert len(values) >= 2, "the model should find a few nuclei in the synthetic field"
        self.deleted = int(values[np.argmax(sizes)])
        layer.data[layer.data == self.deleted] = 0


@pytest.mark.slow
def test_the_readme_annotation_loop_runs_as_written(tmp_path, monkeypatch):
    blocks = readme_blocks()
    assert [language for language, _ in blocks] == ["bash", "python", "bash"]
    segment, = commands(blocks[0][1])
    train, again = commands(blocks[2][1])
    assert segment.startswith("nucleibatch segment ") and "--no-store-image" not in segment
    assert train.startswith("nucleibatch train loop1 ") and "--init default" in train and "--engine local" in train
    assert again.startswith("nucleibatch segment ") and "--model loop1_run/bundle" in again
    fields = tmp_path / "fields"
    fields.mkdir()
    for seed in (3, 4, 5):
        image, _ = synthetic_nuclei((128, 160), n_nuclei=12, radius=(5, 9), seed=seed)
        Image.fromarray(image).save(fields / f"field{seed}.png")

    def run(line: str) -> None:
        argv = shlex.split(line.replace("examples/dsb_demo", str(fields)))
        assert argv[0] == "nucleibatch"
        done = subprocess.run([sys.executable, "-m", "nucleibatch", *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"

    run(segment)
    # the napari step, its code as the README gives it, napari played by FakeNapari
    napari = FakeNapari()
    monkeypatch.setitem(sys.modules, "napari", napari)
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[1][1], "README.md (Correct and fine-tune)", "exec"), {})
    images = pd.read_parquet(OutputFolder(tmp_path / "loop1").images)
    corrected = zarr.open_group(str(OutputFolder(tmp_path / "loop1").masks), mode="r")[images.store_path[0]][label_path(0)][:]
    assert napari.deleted is not None and napari.deleted not in corrected and corrected.any()  # written back
    original = np.asarray(Image.open(fields / f"{images.image_id[0]}.png"))
    np.testing.assert_array_equal(napari.images[0][0], original)  # napari was shown the stored copy

    run(f"{train} {QUICK_TRAIN}")
    assert (tmp_path / "loop1_run" / "bundle" / "config.json").is_file()
    run(again)
    second = pd.read_parquet(OutputFolder(tmp_path / "loop2").images)
    assert (second.status == "ok").all() and len(second) == 3
    assert set(second.model) != {"default"}  # the fine-tuned bundle, not the shipped model
