"""Packaging: the core install (no Ray, no Dask) from a built wheel, on top of an existing torch.

The core venv is made of this venv's installed packages less ray, dask and distributed (linked,
not downloaded: the test needs no network); the wheel is built from a copy of the sources and
installed with `pip install --no-index`, which succeeds only when every core requirement is
already there, and so shows that pip keeps the torch it finds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest
import tomllib

from nucleibatch.output.folder import OutputFolder
from tests.helpers.paths import REPO

LEFT_OUT = ("ray", "dask", "distributed", "pip", "nucleibatch", "__editable__", "_nucleibatch")


def test_the_core_requirements_hold_neither_ray_nor_dask_and_every_extra_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    assert "ray" not in core and "dask" not in core and "distributed" not in core
    extras = project["optional-dependencies"]
    assert {"ray", "dask", "s3", "all"} <= set(extras)
    assert extras["all"] == ["nucleibatch[ray,dask,s3]"]
    pinned = {line.split("==")[0].lower() for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    assert {"ray", "dask", "zarr", "numpy", "scikit-image"} <= pinned
    assert not pinned & {"torch", "torchvision"}  # the user's torch is theirs


def _core_venv(folder: Path) -> Path:
    """A venv holding this one's packages except Ray, Dask and nucleibatch itself; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=300)
    python = folder / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if entry.name.lower().startswith(LEFT_OUT) or (site / entry.name).exists():
            continue
        (site / entry.name).symlink_to(entry)
    return python


def _wheel(folder: Path) -> Path:
    """nucleibatch's wheel, built from a copy of the sources (the checkout stays clean)."""
    source = folder / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "nucleibatch", source / "nucleibatch", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder / "dist"), str(source)], check=True, timeout=600, capture_output=True)
    (wheel,) = (folder / "dist").glob("nucleibatch-*.whl")
    return wheel


@pytest.mark.slow
def test_a_core_install_from_the_wheel_keeps_torch_runs_every_local_command_and_names_the_missing_extras(tmp_path):
    python = _core_venv(tmp_path / "core")
    assert subprocess.run([str(python), "-c", "import ray"], capture_output=True).returncode != 0
    assert subprocess.run([str(python), "-c", "import distributed"], capture_output=True).returncode != 0
    torch_before = subprocess.run([str(python), "-c", "import torch; print(torch.__version__, torch.__file__)"], capture_output=True, text=True, check=True).stdout
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-index", str(_wheel(tmp_path))], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "torch" not in installed.stdout.split("Successfully installed")[-1], installed.stdout  # only nucleibatch
    torch_after = subprocess.run([str(python), "-c", "import torch; print(torch.__version__, torch.__file__)"], capture_output=True, text=True, check=True).stdout
    assert torch_after == torch_before

    nucleibatch = tmp_path / "core" / "bin" / "nucleibatch"
    version = subprocess.run([str(nucleibatch), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("nucleibatch ")
    demo = subprocess.run([str(nucleibatch), "segment", str(REPO / "examples" / "dsb_demo"), "-o", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    images = pd.read_parquet(OutputFolder(tmp_path / "out").images)
    assert len(images) == 5 and (images.status == "ok").all() and (images.n_nuclei > 0).all()
    assert set(images.model) == {"default", "he"}  # the shipped bundles travel in the wheel
    located = subprocess.run([str(python), "-c", "import nucleibatch; print(nucleibatch.__file__)"], capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert str(tmp_path / "core") in located  # the wheel's copy ran, not the checkout
    for command in (
        ["verify", str(tmp_path / "out")],
        ["report", str(tmp_path / "out")],
        ["export", str(tmp_path / "out"), "--format", "geojson"],
        ["evaluate", str(REPO / "examples" / "dsb_demo")],
        ["train", str(REPO / "examples" / "dsb_demo"), "-o", str(tmp_path / "run"), "--engine", "local", "--epochs", "1", "--patches-per-epoch", "4", "--batch-size", "2", "--patch-size", "64", "--no-tune", "--overlay-every", "0"],
    ):
        done = subprocess.run([str(nucleibatch), *command], capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, f"{command[0]}: {done.stderr[-3000:]}"
    assert (tmp_path / "run" / "bundle" / "model.safetensors").is_file()

    for command, extra in (
        (["segment", str(REPO / "examples" / "dsb_demo"), "-o", str(tmp_path / "ray_out"), "--engine", "ray"], "ray"),
        (["segment", str(REPO / "examples" / "dsb_demo"), "-o", str(tmp_path / "dask_out"), "--engine", "dask"], "dask"),
        (["train", str(REPO / "examples" / "dsb_demo"), "-o", str(tmp_path / "run_ray")], "ray"),
    ):
        refused = subprocess.run([str(nucleibatch), *command], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr
        assert f"pip install 'nucleibatch[{extra}]'" in lines[0] and "--engine local" in lines[0]
        assert not (tmp_path / "ray_out").exists() and not (tmp_path / "dask_out").exists()  # refused before OUT was made
