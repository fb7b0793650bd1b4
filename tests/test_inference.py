"""The GPU inference path (bf16 autocast, channels-last) exercised on the CPU: same code, same answers."""

from __future__ import annotations

import copy
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from nucleibatch import load_model
from nucleibatch.annotated import discover_annotated, load_annotated
from nucleibatch.instances import probabilities_to_labels
from nucleibatch.metrics import image_scores
from nucleibatch.model import (
    ModelUsage,
    NucleiModel,
    fold_batch_norms,
    forward_batch,
    predict_image,
    predict_images,
    prepare_network,
    windows_per_call,
)
from nucleibatch.normalize import normalise_image
from tests.helpers.paths import DEMO


def test_bf16_channels_last_path_agrees_with_float32_on_the_cpu():
    model = load_model("default", device="cpu")
    fast_network = prepare_network(copy.deepcopy(model.network), torch.device("cpu"), bf16=True)
    assert fast_network.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for source in list(discover_annotated([DEMO]))[:2]:
        example = load_annotated(source)
        image, _ = normalise_image(example.image)
        usage = ModelUsage()
        reference = predict_image(model.network, image, tile_size=256, halo=32, bf16=False)
        fast = predict_image(fast_network, image, tile_size=256, halo=32, bf16=True, usage=usage)
        assert fast.dtype == np.float32 and fast.shape == reference.shape
        assert not np.array_equal(fast, reference)  # bf16 really ran
        # bf16 rounds the logits: probabilities move a little everywhere and more at the few pixels
        # where a sharp model's sigmoid is steep (the shipped model: up to 0.33 at 1 pixel in 4,000);
        # what matters is that almost all agree closely and the nuclei come out the same
        difference = np.abs(fast - reference)
        assert difference.mean() < 0.01 and np.quantile(difference, 0.999) < 0.1 and (difference > 0.1).mean() < 1e-3
        a, b = probabilities_to_labels(reference, model.postprocess), probabilities_to_labels(fast, model.postprocess)
        assert a.max() > 5 and image_scores(a, b)["map"] >= 0.9
        assert usage.tiles > 0 and usage.busy_seconds > 0 and sum(n * c for (n, _, _), c in usage.batch_shapes.items()) == usage.tiles


def test_batch_size_counts_pixels_in_512_tiles():
    """--batch-size N: N windows of 512², fewer larger ones (at least one), more small ones, so a
    call's memory does not depend on the window (the default window is 1024²)."""
    assert windows_per_call(4, (512, 512)) == 4 and windows_per_call(16, (512, 512)) == 16
    assert windows_per_call(4, (1024, 1024)) == 1 and windows_per_call(16, (1024, 1024)) == 4
    assert windows_per_call(1, (1024, 1024)) == 1 and windows_per_call(4, (256, 256)) == 16
    assert load_model("default").config.tile_size == 1024


def test_tiles_of_several_images_batched_together_give_each_image_alone():
    model = load_model("default", device="cpu")
    rng = np.random.default_rng(0)
    shapes = [(256, 256), (256, 320), (256, 256), (700, 900), (100, 60)]
    images = [rng.random(shape, dtype=np.float32) for shape in shapes]
    boxes = [None, None, (10, 200, 20, 250), (100, 600, 50, 800), None]
    usage = ModelUsage()
    together = predict_images(model.network, images, boxes, tile_size=512, halo=64, batch_size=4, usage=usage)
    # the two 256 x 256 images share one call; the 700 x 900 image's 500 x 750 box is tiled alone
    # (its surroundings are context): 2 x 3 tiles cut at multiples of 32 (rows at 320, columns
    # at 288 and 544), each read with its 64 px halo from a multiple of 32, in windows of
    # 352 or 416 by 352 or 384
    assert usage.batch_shapes[(2, 256, 256)] == 1 and usage.batch_shapes[(1, 256, 320)] == 1 and usage.batch_shapes[(1, 128, 64)] == 1
    large = {shape: count for shape, count in usage.batch_shapes.items() if shape[1:] not in ((256, 256), (256, 320), (128, 64))}
    assert large == {(1, 352, 352): 1, (2, 352, 384): 1, (1, 416, 352): 1, (2, 416, 384): 1} and usage.tiles == 4 + 6
    for image, box, batched in zip(images, boxes, together, strict=True):
        alone = predict_image(model.network, image, tile_size=512, halo=64, batch_size=4, output_box=box)
        np.testing.assert_array_equal(batched, alone)


class _Pointwise(torch.nn.Module):
    """A network whose output at a pixel depends on that pixel only: a tiled prediction of it
    must equal the whole image's, pixel for pixel, whatever tiles and crops were used."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([4.0, -3.0, 8.0]).reshape(3, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([-2.0, 1.0, -4.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_tiles_are_cropped_and_placed_exactly_oracle():
    """Only each batch's kept window is copied back from the device (``forward_batch``'s crop); the
    assembled probabilities equal the pointwise oracle on the whole image, for image borders,
    output boxes and tiles of several images sharing a batch; the fast path returns float16."""
    from nucleibatch.model import forward_batch

    network = _Pointwise().eval()
    rng = np.random.default_rng(1)
    images = [rng.random(shape, dtype=np.float32) for shape in [(700, 900), (200, 150), (256, 256), (391, 517)]]
    boxes = [(100, 650, 33, 700), None, (5, 250, 17, 200), (0, 391, 300, 517)]
    with torch.no_grad():
        oracles = [torch.sigmoid(network(torch.from_numpy(image)[None, None]))[0].numpy() for image in images]
    tiles_counted = set()
    for batch_size, pad_batches in ((1, False), (3, False), (3, True), (16, True)):
        usage = ModelUsage()
        outputs = predict_images(network, images, boxes, tile_size=256, halo=32, batch_size=batch_size, bf16=False, usage=usage, pad_batches=pad_batches)
        for n, h, w in usage.batch_shapes:  # at most batch_size 512² tiles' worth of pixels a call
            assert n <= windows_per_call(batch_size, (h, w))
            if pad_batches:  # CUDA's default: full calls, or padded to a power of two (the padding's outputs dropped)
                assert n == windows_per_call(batch_size, (h, w)) or n & (n - 1) == 0
        if pad_batches and batch_size == 16:  # 12 tiles of 256² in a call of 16
            assert usage.tiles < sum(n * c for (n, _, _), c in usage.batch_shapes.items())
        tiles_counted.add(usage.tiles)
        for output, oracle, box in zip(outputs, oracles, boxes, strict=True):
            y0, y1, x0, x1 = box or (0, oracle.shape[1], 0, oracle.shape[2])
            assert output.dtype == np.float32
            np.testing.assert_allclose(output, oracle[:, y0:y1, x0:x1], rtol=0, atol=1e-6)
    assert len(tiles_counted) == 1  # the images' tiles, not the padding
    fast_network = prepare_network(copy.deepcopy(network), torch.device("cpu"), bf16=True)
    fast = predict_images(fast_network, images, boxes, tile_size=256, halo=32, batch_size=3, bf16=True)
    for output, oracle, box in zip(fast, oracles, boxes, strict=True):
        y0, y1, x0, x1 = box or (0, oracle.shape[1], 0, oracle.shape[2])
        assert output.dtype == np.float32
        np.testing.assert_allclose(output, oracle[:, y0:y1, x0:x1], rtol=0, atol=0.02)  # bf16 network, float16 copy
    # keep_half (segment's blocks): the very same values, in float16
    half = predict_images(fast_network, images, boxes, tile_size=256, halo=32, batch_size=3, bf16=True, keep_half=True)
    for output, reference in zip(half, fast, strict=True):
        assert output.dtype == np.float16
        np.testing.assert_array_equal(output.astype(np.float32), reference)
    assert predict_images(network, images[:1], tile_size=256, halo=32, bf16=False, keep_half=True)[0].dtype == np.float32
    batch = images[0][None, None, :256, :256].copy()
    full = forward_batch(network, batch, torch.device("cpu"), tta=False)
    np.testing.assert_array_equal(forward_batch(network, batch, torch.device("cpu"), tta=False, crop=(32, 224, 10, 256)), full[:, :, 32:224, 10:256])
    assert forward_batch(network, batch, torch.device("cpu"), tta=False, bf16=True).dtype == np.float16


def test_precision_resolves_per_device_and_bad_values_are_refused():
    import pytest

    from nucleibatch.errors import UsageError
    from nucleibatch.model import native_bf16_cpu, uses_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_bf16("bf16", cpu) and not uses_bf16("float32", cuda)
    assert uses_bf16("auto", cuda) and uses_bf16("auto", cpu) == native_bf16_cpu()
    with pytest.raises(UsageError, match="--precision must be one of auto, float32, bf16"):
        uses_bf16("fp8", cpu)
    model = load_model("default", precision="float32")
    assert not model.bf16 and model.network.encoder.conv1.weight.is_contiguous()  # float32: no channels-last
    assert load_model("default", precision="bf16").bf16


def test_batch_norms_folded_into_convolutions_compute_the_same_function():
    model = load_model("default", device="cpu", precision="float32")
    trained_state = {name: tensor.clone() for name, tensor in model.network.state_dict().items()}
    folded = model.inference_network
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
    assert any(isinstance(module, torch.nn.BatchNorm2d) for module in model.network.modules())
    image, _ = normalise_image(load_annotated(next(iter(discover_annotated([DEMO])))).image)
    reference = predict_image(model.network, image, tile_size=256, halo=32, bf16=False)
    np.testing.assert_allclose(model.predict(image), predict_image(folded, image, tile_size=256, halo=32, bf16=False))
    np.testing.assert_allclose(predict_image(folded, image, tile_size=256, halo=32, bf16=False), reference, atol=1e-4)
    # the bundle's network is untouched (training and saving use it); the copy is made once,
    # again when the network is replaced (a distributed worker prepares its own), and not pickled
    assert all(torch.equal(model.network.state_dict()[name], tensor) for name, tensor in trained_state.items())
    assert model.inference_network is folded
    model.network = copy.deepcopy(model.network)
    assert model.inference_network is not folded
    assert pickle.loads(pickle.dumps(model))._inference is None
    # two threads asking at once (the local engine's) get one copy, made once
    fresh = load_model("default", device="cpu", precision="float32")
    with ThreadPoolExecutor(2) as pool:
        copies = list(pool.map(lambda _: fresh.inference_network, range(2)))
    assert copies[0] is copies[1]
    # bf16 channels-last: the folded convolutions keep the layout, their weights are stored in
    # bf16, and the outputs are those of autocast casting float32 weights on every call
    fast = load_model("default", device="cpu", precision="bf16")
    folded_convolutions = [m for m in fast.inference_network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in folded_convolutions if m.in_channels > 1)
    assert all(m.weight.dtype == torch.bfloat16 for m in folded_convolutions)
    batch = image[None, None, :256, :256].copy()
    np.testing.assert_array_equal(forward_batch(fast.inference_network, batch, torch.device("cpu"), tta=False, bf16=True), forward_batch(fold_batch_norms(fast.network), batch, torch.device("cpu"), tta=False, bf16=True))


class _NormBeforeConvolution(torch.nn.Module):
    """Registers a convolution before a batch norm but runs the norm first: folding would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)
        self.norm.running_mean.uniform_(-1, 1)
        self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


def test_folding_checks_the_result_and_leaves_networks_it_cannot_fold(caplog):
    misleading = _NormBeforeConvolution().eval()
    assert fold_batch_norms(misleading) is misleading  # the check on a random input caught it
    assert "not folded" in caplog.text
    # on the bf16 path such a network keeps its batch norm in float32 (as autocast runs it) and
    # only its convolution's weights go to bf16: the outputs of autocast, bit for bit
    model = NucleiModel(network=misleading, config={}, precision="bf16")
    runs = model.inference_network
    assert runs.norm.running_mean.dtype == torch.float32 and runs.conv.weight.dtype == torch.bfloat16
    x = np.random.default_rng(0).random((1, 4, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(forward_batch(runs, x, torch.device("cpu"), tta=False, bf16=True), forward_batch(misleading, x, torch.device("cpu"), tta=False, bf16=True))
    model.precision = "float32"  # another precision: made again, in float32
    assert model.inference_network is not runs and model.inference_network.conv.weight.dtype == torch.float32
    training = load_model("default", device="cpu", precision="float32").network.train()
    assert fold_batch_norms(training) is training  # batch statistics: nothing to fold
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1)).eval()
    assert fold_batch_norms(plain) is plain
