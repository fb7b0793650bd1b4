"""Shared fixtures. Synthetic arrays come from nucleibatch.synthetic (the one shared data module)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The real annotated data sits beside the repo (../shared/data); CI lays it there too.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018" / "stage1_train"
MONUSEG_DATA = SHARED_DATA.parents[1] / "monuseg2018_train"


@pytest.fixture(scope="session")
def dsb_root() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared DSB data is missing at {SHARED_DATA}; clone the repo beside ../shared")
    return SHARED_DATA


@pytest.fixture(scope="session")
def monuseg_root() -> Path:
    if not MONUSEG_DATA.is_dir():
        pytest.fail(f"the shared MoNuSeg data is missing at {MONUSEG_DATA}; clone the repo beside ../shared")
    return MONUSEG_DATA


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


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    # two cores: keep torch from oversubscribing when Ray/Dask workers run beside the tests
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield
