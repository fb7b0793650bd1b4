"""The typed bundle config: round trip of the shipped bundles' config.json, what older version-1
configs that lack keys load as, and that the config imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from nucleibatch.errors import ModelBundleError
from nucleibatch.model.config import BUNDLE_FORMAT, BundleConfig, default_config

SHIPPED = ("default", "he")


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_config_round_trips_to_the_same_json(name):
    from nucleibatch.model.bundle import CONFIG_NAME, SHIPPED_BUNDLES

    raw = json.loads((SHIPPED_BUNDLES[name] / CONFIG_NAME).read_text())
    assert BundleConfig.from_dict(raw).to_dict() == raw


def test_a_fresh_config_writes_the_keys_of_a_trained_bundle_before_its_weights():
    written = default_config("resnet18", tile_size=256, halo=32).to_dict()
    assert list(written)[:3] == ["format", "name", "architecture"] and written["format"] == BUNDLE_FORMAT
    assert written["name"] == "nuclei-unet-resnet18" and written["tile_size"] == 256 and written["halo"] == 32
    assert "weights" not in written and "licence" not in written and written["init"] is None
    assert BundleConfig.from_dict(written) == default_config("resnet18", tile_size=256, halo=32)


def test_an_older_config_gets_what_its_readers_assumed():
    minimal = {"encoder": "resnet18", "in_channels": 1, "classes": ["body", "contour", "contact"]}
    config = BundleConfig.from_dict(minimal)
    assert config.tile_size == 512 and config.decoder_channels == [256, 128, 64, 32, 16]  # not a fresh network's
    assert config.halo == 96 and config.tta is False and config.architecture == "Unet" and config.encoder_depth == 5
    assert config.serves == ["fluorescence", "brightfield"] and config.input == "grey"
    assert config.name == "unnamed" and config.weights_file == "model.safetensors" and config.weights_sha256 is None
    stained = BundleConfig.from_dict(minimal | {"normalization": {"input": "haematoxylin"}, "modalities": ["stained"], "scale": None})
    assert stained.serves == ["stained"] and "modalities" not in stained.to_dict()
    assert stained.scale == {"nucleus_diameter_px": None, "pixel_size_um": None}
    kept = BundleConfig.from_dict(minimal | {"note": "hand-made"})
    assert kept.to_dict()["note"] == "hand-made" and replace(kept, tta=True).extra == {"note": "hand-made"}


def test_configs_that_cannot_be_read():
    with pytest.raises(ModelBundleError, match="lacks 'classes'"):
        BundleConfig.from_dict({"encoder": "resnet18", "in_channels": 1})
    with pytest.raises(ModelBundleError, match="newer than this nucleibatch"):
        BundleConfig.from_dict({"format": "nucleibatch-bundle/2", "encoder": "resnet18", "in_channels": 1, "classes": ["body"]})


def test_the_config_and_the_pipeline_import_no_torch():
    code = "import sys, nucleibatch.model.config, nucleibatch.segment.units, nucleibatch.segment.stitch; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
