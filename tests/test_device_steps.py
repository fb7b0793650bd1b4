"""The device's steps (segment --instances-on device) run on CPU tensors here, the code a GPU runs:
raw pixels normalised and resampled on the device give the host's network input, the network
cuts its windows there, and whole runs find the host path's nuclei."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from nucleibatch.metrics import image_scores
from nucleibatch.normalize import (
    NormStats,
    compute_stats,
    network_channel,
    normalise_pixels,
    to_grey,
)
from nucleibatch.normalize_torch import (
    grey_on_device,
    network_input_on_device,
    on_device_normalisable,
    upload_pixels,
)
from nucleibatch.output.folder import OutputFolder, label_path
from nucleibatch.scale import from_network_scale, to_network_scale
from nucleibatch.scale_torch import from_network_scale_on_device, to_network_scale_on_device
from nucleibatch.segment.job import run_segment_job
from nucleibatch.segment.settings import SegmentSettings
from tests.helpers import input_files as files
from tests.helpers.outputs import image_groups

CPU = torch.device("cpu")


def _pixels(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize(
    ("dtype", "shape", "channel", "input", "invert"),
    [
        (np.uint8, (40, 52), None, "grey", False),
        (np.uint8, (40, 52, 3), None, "grey", True),
        (np.uint8, (40, 52, 4), None, "grey", False),  # RGBA: alpha ignored
        (np.uint8, (40, 52, 2), 1, "grey", False),
        (np.uint16, (40, 52), None, "grey", True),
        (np.uint16, (40, 52, 3), None, "grey", False),
        (np.uint16, (40, 52, 6), 4, "grey", False),
        (np.uint8, (40, 52, 3), None, "haematoxylin", True),
        (np.uint16, (40, 52, 4), None, "haematoxylin", True),
        (np.uint8, (40, 52), None, "haematoxylin", False),
    ],
)
def test_raw_pixels_normalised_on_the_device_equal_the_hosts(dtype, shape, channel, input, invert):
    pixels = _pixels(dtype, shape)
    base = compute_stats(network_channel(pixels, channel, input), input=input)
    stats = dataclasses.replace(base, invert=invert)
    assert on_device_normalisable(pixels, stats, channel)
    on_device = network_input_on_device(pixels, upload_pixels(pixels, CPU), stats, channel, CPU)
    expected = normalise_pixels(pixels, stats, channel)
    assert on_device.dtype == torch.float32 and on_device.shape == expected.shape
    # grey: the very table, gathered; haematoxylin: the same tables summed in the same order
    np.testing.assert_array_equal(on_device.numpy(), expected)


def test_other_pixels_are_normalised_on_the_host_and_uploaded():
    stats = NormStats(0.1, 0.9, False)
    floats = np.random.default_rng(1).random((30, 20, 1)).astype(np.float32)
    many = _pixels(np.uint8, (30, 20, 6))  # six channels averaged: no table
    for pixels in (floats, many):
        assert not on_device_normalisable(pixels, stats, None)
        raw = upload_pixels(pixels, CPU) if pixels.dtype == np.uint8 else None
        np.testing.assert_array_equal(network_input_on_device(pixels, raw, stats, None, CPU).numpy(), normalise_pixels(pixels, stats, None))
    with pytest.raises(ValueError, match="uint8 and uint16"):
        upload_pixels(floats, CPU)


def test_sixteen_bit_pixels_keep_their_values_on_the_device():
    pixels = np.array([[0, 1, 32767], [32768, 40000, 65535]], np.uint16)
    uploaded = upload_pixels(pixels, CPU)
    assert uploaded.dtype == torch.int32 and uploaded.tolist() == pixels.astype(np.int64).tolist()


@pytest.mark.parametrize(("shape", "channel"), [((20, 24), None), ((20, 24, 3), None), ((20, 24, 4), None), ((20, 24, 5), None), ((20, 24, 3), 2)])
def test_the_measured_intensity_made_on_the_device_is_the_hosts(shape, channel):
    for dtype in (np.uint8, np.uint16):
        pixels = _pixels(dtype, shape, seed=3)
        np.testing.assert_array_equal(grey_on_device(upload_pixels(pixels, CPU), channel).numpy(), to_grey(pixels, channel))


@pytest.mark.parametrize("scale", [0.45, 0.8, 1.3, 2.0])
def test_resampling_on_the_device_is_the_hosts(scale):
    image = np.random.default_rng(2).random((57, 43)).astype(np.float32)
    on_device = to_network_scale_on_device(torch.from_numpy(image.copy()), scale).numpy()
    expected = to_network_scale(image, scale)
    assert on_device.shape == expected.shape and on_device.dtype == np.float32
    np.testing.assert_array_equal(on_device, expected)
    for dtype in (np.float32, np.float16):
        probabilities = np.random.default_rng(3).random((3, 57, 43)).astype(dtype)
        box = (2, 30, 5, 17)
        back = from_network_scale_on_device(torch.from_numpy(probabilities.copy()), scale, (1, 3), box).numpy()
        expected_back = from_network_scale(probabilities, scale, (1, 3), box)
        assert back.shape == expected_back.shape and back.dtype == expected_back.dtype
        np.testing.assert_array_equal(back, expected_back)


def test_windows_cut_from_images_on_the_device_give_the_hosts_probabilities(tiny_bundle):
    """predict_many of tensors (windows cut and mirror-padded on the device) = of NumPy arrays:
    one-tile images of odd sizes (padded past their own size), and a tiled image with an output box."""
    from nucleibatch.model import load_model

    model = load_model(tiny_bundle, device="cpu")
    model.config = dataclasses.replace(model.config, tta=False)
    rng = np.random.default_rng(4)
    images = [rng.random(shape).astype(np.float32) for shape in ((7, 40), (70, 33), (300, 410))]
    boxes = [None, (3, 60, 0, 33), (40, 290, 17, 380)]
    on_host = model.predict_many(images, batch_size=2, output_boxes=boxes)
    on_device = model.predict_many([torch.from_numpy(image) for image in images], batch_size=2, output_boxes=boxes, on_device=True)
    for host, device in zip(on_host, on_device, strict=True):
        assert isinstance(device, torch.Tensor)
        np.testing.assert_array_equal(device.numpy(), host)


def test_symmetric_padding_on_the_device_is_numpys():
    from nucleibatch.model.predict import _pad_to

    tile = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)
    for window in ((3, 5), (4, 9), (11, 12), (32, 32)):
        np.testing.assert_array_equal(_pad_to(torch.from_numpy(tile), window).numpy(), _pad_to(tile, window))


def test_enlarged_and_shrunk_colour_images_find_the_hosts_nuclei_on_the_device(tmp_path, monkeypatch):
    """Whole runs of the device's steps (raw RGBA pixels up, normalised, resampled and labelled
    there) against the host's, on the 5 real DSB demo fields at two scales (--diameter). A tensor
    is never handed to NumPy, which a CUDA tensor refuses (here on the CPU it would pass unseen)."""

    def as_on_cuda(tensor, *args, **kwargs):
        raise TypeError("can't convert a device tensor to numpy (as for cuda:0): use .cpu() first")

    monkeypatch.setattr(torch.Tensor, "__array__", as_on_cuda)
    files.write_small_archive(tmp_path / "in", bad_file=False)
    for diameter in (12, 30):  # the default bundle's nuclei are 19.3 px: enlarged, then shrunk
        outs = {}
        for instances_on in ("cpu", "device"):
            out = tmp_path / f"{instances_on}-{diameter}"
            settings = SegmentSettings(block_size=256, block_margin=64, instances_on=instances_on, diameter=diameter)
            summary = run_segment_job([str(tmp_path / "in" / "copy_0")], out, model="default", device="cpu", settings=settings, progress=False)
            assert summary.n_failed == 0 and summary.n_nuclei > 20
            outs[instances_on] = out
        images = pd.read_parquet(OutputFolder(outs["device"]).images)
        assert (images.scale != 1.0).all()
        cpu_root, device_root = (zarr.open_group(OutputFolder(outs[k]).masks, mode="r") for k in ("cpu", "device"))
        for name in image_groups(cpu_root):
            agreement = image_scores(np.asarray(cpu_root[label_path(0, name)]), np.asarray(device_root[label_path(0, name)]))
            assert agreement["ap50"] >= 0.95 and agreement["map"] >= 0.9, (diameter, name, agreement)
