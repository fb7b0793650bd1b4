"""Shared fixtures. Synthetic arrays come from nucleibatch.synthetic (the one shared data module);
plain helpers from tests/helpers/."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.helpers.outputs import write_demo_segment_out
from tests.helpers.paths import DSB_DATA, MONUSEG_DATA, SMALL_DSB_DATA, SMALL_MONUSEG_DATA
from tests.helpers.processes import alive, descendants


@pytest.fixture(scope="session")
def dsb_root() -> Path:
    """The real DSB 2018 stage 1 training set (545 images): for what only real data shows."""
    if not DSB_DATA.is_dir():
        pytest.fail(f"the shared DSB data is missing at {DSB_DATA}; clone the repo beside ../shared")
    return DSB_DATA


@pytest.fixture(scope="session")
def monuseg_root() -> Path:
    """The real MoNuSeg 2018 training tiles (30 H&E tiles): for what only real tissue shows."""
    if not MONUSEG_DATA.is_dir():
        pytest.fail(f"the shared MoNuSeg data is missing at {MONUSEG_DATA}; clone the repo beside ../shared")
    return MONUSEG_DATA


@pytest.fixture(scope="session")
def small_dsb_root() -> Path:
    """6 small generated fluorescence fields in the DSB layout (tests/data/dsb, committed)."""
    return SMALL_DSB_DATA


@pytest.fixture(scope="session")
def small_monuseg_root() -> Path:
    """3 small generated H&E-like tiles in the MoNuSeg layout (tests/data/monuseg, committed)."""
    return SMALL_MONUSEG_DATA


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A small random-weight model bundle (shallow resnet18 U-Net): fast, for plumbing tests."""
    from dataclasses import replace

    import torch

    from nucleibatch.model import build_network, default_config, save_bundle

    torch.manual_seed(0)
    config = replace(default_config("resnet18", tile_size=256, halo=32), name="tiny-test", encoder_depth=3, decoder_channels=[32, 16, 8])
    network = build_network(config)
    return save_bundle(network, config, tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def _demo_segment_run(tmp_path_factory) -> Path:
    """The one real run behind demo_segment_out; never handed to a test (they change their OUT)."""
    return write_demo_segment_out(tmp_path_factory.mktemp("demo_segment"))


@pytest.fixture(scope="module")
def demo_segment_out(_demo_segment_run, tmp_path_factory) -> Path:
    """A finished segment OUT, the module's own copy: the shipped model on the two demo images
    DEMO_OUT_IDS (ok) and an empty PNG 'broken' (failed); see helpers.outputs.write_demo_segment_out."""
    out = tmp_path_factory.mktemp("demo_segment_copy") / "out"
    shutil.copytree(_demo_segment_run, out, symlinks=True)
    return out


@pytest.fixture(scope="module")
def ray_session():
    """Ray Train starts a private local Ray inside `train`; shut it down after the module and check
    that none of the processes it started is left."""
    import ray

    before = set(descendants(os.getpid()))  # e.g. multiprocessing's resource tracker of earlier tests
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)  # never join another cluster from the tests
        yield
    started = [pid for pid in descendants(os.getpid()) if pid not in before]
    ray.shutdown()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(pid) for pid in started):
        time.sleep(0.5)
    left = sorted(pid for pid in started if alive(pid))
    assert not left, f"processes left after ray.shutdown(): {left}"


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    # two cores: keep torch from oversubscribing when Ray/Dask workers run beside the tests
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield
