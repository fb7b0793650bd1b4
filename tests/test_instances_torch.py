"""Instance labels on the network's device (torch), run here on the CPU: the same code path as on
a GPU, checked against the NumPy / scikit-image version."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from nucleibatch import instances_torch as instance_torch
from nucleibatch.instances import (
    InstanceParams,
    instance_labels,
    probabilities_to_labels,
    relabel_sequential,
    remove_small,
)
from nucleibatch.instances_torch import (
    connected_components,
    instance_labels_on,
    instance_labels_torch,
)
from nucleibatch.metrics import image_scores
from nucleibatch.synthetic import synthetic_nuclei
from nucleibatch.targets import make_targets

CPU = torch.device("cpu")


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same objects (same background, ids in one-to-one correspondence)."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def torch_labels(probabilities: np.ndarray, params: InstanceParams | None = None, levels: int = 16) -> np.ndarray:
    """What segment keeps of the device labels: objects of at least min_size, numbered 1..N."""
    params = params or InstanceParams()
    return relabel_sequential(remove_small(instance_labels_on(CPU, probabilities, params, levels), params.min_size))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("density", [0.3, 0.55, 0.7])
def test_connected_components_equal_scipy_label(seed, density):
    """Oracle: scipy's 4-connected labelling of random masks (spirals and long snakes included by
    the random fields' density near the percolation threshold)."""
    mask = np.random.default_rng(seed).random((61, 83)) < density
    ours = connected_components(torch.from_numpy(mask)).numpy()
    theirs, _ = ndi.label(mask)
    assert same_partition(ours, theirs)


def test_connected_components_of_a_long_spiral_and_of_nothing():
    # one component winding through the whole array: the longest path propagation can face
    mask = np.zeros((41, 41), dtype=bool)
    y0, y1, x0, x1 = 0, 41, 0, 41
    while y1 - y0 > 2 and x1 - x0 > 2:
        mask[y0, x0:x1] = True
        mask[y0:y1, x1 - 1] = True
        mask[y1 - 1, x0:x1] = True
        mask[y0 + 2 : y1, x0] = True
        mask[y0 + 2, x0 : x0 + 3] = True
        y0, y1, x0, x1 = y0 + 4, y1 - 4, x0 + 4, x1 - 4
    ours = connected_components(torch.from_numpy(mask)).numpy()
    assert same_partition(ours, ndi.label(mask)[0])
    assert not connected_components(torch.zeros((5, 7), dtype=torch.bool)).any()


@pytest.mark.parametrize("seed", range(3))
def test_isolated_nuclei_are_the_same_as_the_numpy_ones(seed):
    """A mask component with at most one seed is one nucleus either way: the exact same pixels."""
    _, labels = synthetic_nuclei((160, 192), n_nuclei=30, seed=seed)
    touching = np.unique(labels[make_targets(labels)[2] > 0])
    labels = relabel_sequential(np.where(np.isin(labels, touching), 0, labels))  # nuclei that touch none
    probabilities = np.stack([ndi.gaussian_filter(t, 0.7) for t in make_targets(labels)])
    params = InstanceParams(min_size=1)
    expected = probabilities_to_labels(probabilities, params)
    assert expected.max() >= 8
    assert same_partition(torch_labels(probabilities, params), expected)


@pytest.mark.parametrize("seed", range(3))
def test_touching_nuclei_agree_with_the_watershed(seed):
    """Where nuclei touch, the banded flooding and scikit-image's watershed differ on pixels where
    they meet (these blurred exact targets are flat at 1 inside nuclei, where both floods break
    ties their own way): the same nuclei, matched at IoU 0.5, and as good against the truth."""
    _, labels = synthetic_nuclei((192, 192), n_nuclei=45, seed=seed)
    probabilities = np.stack([ndi.gaussian_filter(t, 1.0) for t in make_targets(labels)])
    params = InstanceParams()
    reference = probabilities_to_labels(probabilities, params)
    ours = torch_labels(probabilities, params)
    agreement = image_scores(reference, ours)
    assert agreement["n_pred"] == agreement["n_true"]
    assert agreement["ap50"] >= 0.97
    assert agreement["map"] >= 0.85
    assert image_scores(labels, ours)["map"] >= image_scores(labels, reference)["map"] - 0.02


def test_float16_input_gives_the_same_labels_as_float32():
    _, labels = synthetic_nuclei((128, 160), n_nuclei=30, seed=4)
    probabilities = np.stack([ndi.gaussian_filter(t, 1.0) for t in make_targets(labels)]).astype(np.float16)
    half = instance_labels_on(CPU, probabilities)
    np.testing.assert_array_equal(half, instance_labels_on(CPU, probabilities.astype(np.float32)))
    assert half.dtype == np.int32
    ids = np.unique(half)
    np.testing.assert_array_equal(ids, np.arange(ids.size))  # 0 and 1..N


def test_small_seeds_are_dropped_and_unseeded_components_kept():
    # the 5x5 nucleus's seed is 1 px (< min_seed_size 4): its mask component is kept, unseeded,
    # as in the NumPy version
    labels = np.zeros((32, 32), dtype=np.int32)
    labels[4:9, 4:9] = 1
    labels[15:27, 15:27] = 2
    probabilities = make_targets(labels)
    params = InstanceParams(min_seed_size=4, min_size=8)
    assert same_partition(torch_labels(probabilities, params), labels)
    assert same_partition(instance_labels_on(CPU, probabilities, params), instance_labels(probabilities, params))


def test_empty_body_and_bad_arguments():
    assert not instance_labels_on(CPU, np.zeros((3, 10, 12), np.float32)).any()
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        instance_labels_torch(torch.zeros((10, 12)))
    with pytest.raises(ValueError, match="levels"):
        instance_labels_torch(torch.zeros((3, 10, 12)), levels=0)


def test_transposed_tensors_and_big_endian_arrays_give_the_same_labels():
    _, labels = synthetic_nuclei((64, 80), n_nuclei=12, seed=5)
    probabilities = np.stack([ndi.gaussian_filter(t, 1.0) for t in make_targets(labels)]).astype(np.float32)
    expected = instance_labels_on(CPU, probabilities)
    transposed = instance_labels_torch(torch.from_numpy(np.ascontiguousarray(probabilities.transpose(0, 2, 1))).transpose(1, 2)).numpy()
    assert same_partition(transposed, expected)
    np.testing.assert_array_equal(instance_labels_on(CPU, probabilities.astype(">f4")), expected)


def test_ids_of_arrays_above_a_billion_pixels_are_int64_while_labelling_and_give_the_same_labels(monkeypatch):
    # ids reach 2 * H * W (unseeded components come after the seeds): int32 overflows above
    # about 1.07e9 pixels, one in-memory image of segment_image; int64 must give the same labels
    assert instance_torch.label_dtype(2**30 - 1) == torch.int32
    assert instance_torch.label_dtype(2**30) == torch.int64
    assert instance_torch.label_dtype(32768 * 32768) == torch.int64
    labels = np.zeros((48, 64), dtype=np.int32)
    labels[4:9, 4:9] = 1  # seed below min_seed_size: an unseeded component, id above H * W
    _, nuclei = synthetic_nuclei((48, 40), n_nuclei=8, seed=6)
    labels[:, 24:] = np.where(nuclei > 0, nuclei + 1, 0)
    probabilities = make_targets(labels)
    params = InstanceParams(min_seed_size=4, min_size=8)
    expected = instance_labels_on(CPU, probabilities, params)
    calls = []
    monkeypatch.setattr(instance_torch, "label_dtype", lambda pixels: calls.append(pixels) or torch.int64)
    wide = instance_labels_on(CPU, probabilities, params)
    assert calls and wide.dtype == np.int32  # int64 while labelling; the final ids 1..N fit int32
    np.testing.assert_array_equal(wide, expected)


def test_a_batch_of_images_of_several_sizes_gives_each_image_its_own_labels():
    """Images labelled together (padded to one shape with zero probabilities) get exactly the
    nuclei they get alone, with ids that do not repeat across the batch."""
    shapes = [(96, 128), (128, 80), (64, 64)]
    alone, batch = [], torch.zeros((len(shapes), 3, 128, 128))
    for k, shape in enumerate(shapes):
        _, labels = synthetic_nuclei(shape, n_nuclei=12, seed=10 + k)
        probabilities = np.stack([ndi.gaussian_filter(t, 1.0) for t in make_targets(labels)]).astype(np.float32)
        alone.append(instance_labels_torch(torch.from_numpy(probabilities)).numpy())
        batch[k, :, : shape[0], : shape[1]] = torch.from_numpy(probabilities)
    together = instance_torch.instance_labels_batch(batch).numpy()
    assert together.shape == (3, 128, 128)
    for k, (height, width) in enumerate(shapes):
        assert alone[k].max() > 5
        assert same_partition(together[k, :height, :width], alone[k])
        assert not together[k, height:].any() and not together[k, :, width:].any()
    ids = [set(np.unique(together[k])) - {0} for k in range(3)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
