"""Per-nucleus measurements on the labels' device (torch), run here on CPU tensors: the same code a
GPU runs, checked column by column against the NumPy version :func:`measure_labels` (itself
checked against skimage's regionprops in tests/test_measure.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucleibatch import measure_torch
from nucleibatch.measure import measure_labels
from nucleibatch.measure_torch import measure_batch_torch, measure_labels_torch
from nucleibatch.synthetic import synthetic_nuclei
from tests.helpers.measurements import assert_same_measurement_columns, awkward_shapes


def check(
    labels: np.ndarray,
    intensity: np.ndarray,
    dtype: torch.dtype = torch.int64,
    origin=(0, 0),
    id_offset=0,
) -> int:
    """measure_labels_torch of CPU tensors == measure_labels of the same arrays; the object count."""
    ours = measure_labels_torch(
        torch.from_numpy(labels).to(dtype),
        torch.from_numpy(intensity),
        origin=origin,
        id_offset=id_offset,
    )
    return assert_same_measurement_columns(
        ours, measure_labels(labels, intensity, origin=origin, id_offset=id_offset)
    )


def awkward_nuclei(seed: int, shape=(300, 260)) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic nuclei (touching, cut by the image's edges) with sparse, shuffled ids and a NaN and
    an infinite intensity pixel inside nuclei."""
    image, labels = synthetic_nuclei(shape, n_nuclei=70, seed=seed)
    rng = np.random.default_rng(seed)
    n = int(labels.max())
    sparse = np.zeros(n + 1, dtype=np.int64)
    sparse[1:] = np.sort(rng.choice(np.arange(1, 40 * n), size=n, replace=False))[
        rng.permutation(n)
    ]
    labels = sparse[labels]
    intensity = image.astype(np.float32)
    ys, xs = np.nonzero(labels)
    intensity[ys[0], xs[0]] = np.nan
    intensity[ys[-1], xs[-1]] = np.inf
    return labels, intensity


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("seed", range(3))
def test_synthetic_nuclei_equal_measure_labels(seed, dtype):
    labels, intensity = awkward_nuclei(seed)
    # the cases the test is for are there: touching nuclei, nuclei on the edges, gaps in the ids
    touching = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    assert touching.any()
    assert np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).any()
    ids = np.unique(labels[labels > 0])
    assert ids.size > 30 and ids[-1] > 2 * ids.size
    assert check(labels, intensity, dtype) == ids.size
    assert check(labels, intensity, dtype, origin=(1000, 2048), id_offset=70_000) == ids.size


def test_awkward_shapes_equal_measure_labels():
    labels = awkward_shapes(np.int64)
    labels[0, 49] = 40  # two pieces of one label, empty rows between them (a nucleus cut at a seam)
    labels[3:5, 47:49] = 40
    intensity = np.random.default_rng(0).random(labels.shape) * 1000
    assert check(labels, intensity) == 9


def test_nan_and_infinite_intensities_average_the_finite_pixels_only():
    labels = np.zeros((6, 6), np.int32)
    labels[0:2, 0:2] = 1
    labels[3:5, 3:5] = 2
    intensity = np.full((6, 6), 10.0)
    intensity[0, 0] = np.nan
    intensity[1, 1] = 40.0
    intensity[3:5, 3:5] = np.inf
    columns = measure_labels_torch(torch.from_numpy(labels), torch.from_numpy(intensity))
    assert columns["mean_intensity"][0] == pytest.approx(20.0)
    assert np.isnan(columns["mean_intensity"][1])
    assert check(labels, intensity, torch.int32) == 2


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_empty_label_image_gives_empty_typed_columns(dtype):
    labels = torch.zeros((16, 12), dtype=dtype)
    ours = measure_labels_torch(labels, torch.rand(16, 12))
    assert_same_measurement_columns(ours, measure_labels(labels.numpy(), np.zeros((16, 12))))
    assert ours["label"].dtype == np.uint32 and ours["area"].dtype == np.int64


def test_ids_far_beyond_the_pixel_count_are_sorted_not_binned(monkeypatch):
    labels, intensity = awkward_nuclei(4, shape=(128, 160))
    reference = measure_labels(labels, intensity, id_offset=5)
    # the torch.unique path, forced on the same labels
    monkeypatch.setattr(measure_torch, "_DENSE_BINS_PER_PIXEL", -1)
    assert check(labels, intensity, torch.int32, id_offset=5) > 10
    monkeypatch.undo()
    # an id near int32's top (a bincount that long would need gigabytes): only the label differs
    top = int(labels.max())
    huge = np.where(labels == top, np.iinfo(np.int32).max, labels)
    ours = measure_labels_torch(
        torch.from_numpy(huge).to(torch.int32), torch.from_numpy(intensity), id_offset=5
    )
    reference["label"][-1] = np.uint32(np.iinfo(np.int32).max + 5)
    assert_same_measurement_columns(ours, reference)


def test_batch_equals_image_by_image():
    shape = (96, 112)
    images = [awkward_nuclei(seed, shape) for seed in (5, 6)]
    images.insert(
        1, (np.zeros(shape, np.int64), np.ones(shape, np.float32))
    )  # an empty image between
    labels = torch.from_numpy(np.stack([lab for lab, _ in images])).to(torch.int32)
    intensity = torch.from_numpy(np.stack([inten for _, inten in images]))
    origins = [(0, 0), (96, 0), (96, 112)]
    offsets = [0, 1000, 2000]
    batch = measure_batch_torch(labels, intensity, origins=origins, id_offsets=offsets)
    assert len(batch) == 3
    counts = [
        assert_same_measurement_columns(ours, measure_labels(lab, inten, origin=o, id_offset=k))
        for ours, (lab, inten), o, k in zip(batch, images, origins, offsets, strict=True)
    ]
    assert counts[1] == 0 and counts[0] > 10 and counts[2] > 10


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        measure_labels_torch(torch.zeros((2, 4, 4), dtype=torch.int32), torch.zeros((2, 4, 4)))
    with pytest.raises(ValueError):
        measure_batch_torch(torch.zeros((2, 4, 4), dtype=torch.int32), torch.zeros((2, 4, 5)))
    with pytest.raises(TypeError):
        measure_labels_torch(torch.zeros((4, 4)), torch.zeros((4, 4)))
