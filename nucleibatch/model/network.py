"""The network a bundle config describes (segmentation_models_pytorch, by name) and the
batch-norm folding that predictions run it with."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import UsageError
from .config import BundleConfig

log = logging.getLogger(__name__)
ARCHITECTURES = ("Unet", "UnetPlusPlus", "FPN", "Linknet")


def build_network(config: BundleConfig) -> torch.nn.Module:
    """Build the smp network a config describes (weights random unless ``encoder_weights`` names a set).

    Raises:
        UsageError: unknown architecture or encoder (the message lists valid names).
    """
    import segmentation_models_pytorch as smp

    architecture = config.architecture
    if architecture not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}")
    encoder = config.encoder
    valid_encoders = smp.encoders.get_encoder_names()
    if encoder not in valid_encoders and not encoder.startswith("tu-"):
        raise UsageError(
            f"unknown encoder {encoder!r}; light choices on a CPU: resnet18, resnet34, mobilenet_v2, "
            f"efficientnet-b0; all: {', '.join(sorted(valid_encoders))} or tu-<timm name>"
        )
    kwargs: dict[str, Any] = dict(
        encoder_name=encoder,
        encoder_weights=config.encoder_weights,
        in_channels=config.in_channels,
        classes=len(config.classes),
        encoder_depth=config.encoder_depth,
    )
    if architecture in ("Unet", "UnetPlusPlus"):
        kwargs["decoder_channels"] = tuple(config.decoder_channels)
    return getattr(smp, architecture)(**kwargs)


def fold_batch_norms(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of an eval-mode network with every batch norm that directly follows a convolution
    folded into that convolution's weights and bias: the same function, one pass over the
    activations less per convolution (the default model's network runs 1.08-1.28x faster per
    call on a 2-core CPU in bf16, ``benchmarks/folding.py``).

    Pairs are the modules' consecutive children (a ``Conv2d`` registered just before a
    ``BatchNorm2d`` of its output channels, with running statistics), which is the order in which
    the U-Nets' encoders and decoders run them. Because registration order need not be the order
    of ``forward``, the copy is checked against the network on a small random input (float32, on
    the CPU: no TF32), and the network itself is returned, with a warning, if they differ or the
    fold fails; also, silently, if any module is in training mode (batch statistics) or there is
    no such pair.
    """
    if any(module.training for module in network.modules()):
        return network
    try:
        folded = copy.deepcopy(network)
        pairs = 0
        for parent in folded.modules():
            names = list(parent._modules)
            for first, second in zip(names, names[1:], strict=False):
                conv, norm = parent._modules[first], parent._modules[second]
                if (
                    isinstance(conv, torch.nn.Conv2d)
                    and isinstance(norm, torch.nn.BatchNorm2d)
                    and norm.num_features == conv.out_channels
                    and norm.running_mean is not None
                ):
                    fused = fuse_conv_bn_eval(conv, norm)
                    channels_last = conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
                    parent._modules[first] = fused.to(memory_format=torch.channels_last) if channels_last else fused
                    parent._modules[second] = torch.nn.Identity()
                    pairs += 1
        if not pairs:
            return network
        if _same_function(network, folded):
            return folded
        log.warning("the network's batch norms are not folded: the folded copy computes another function (layers registered in another order than they run)")
    except Exception as error:  # noqa: BLE001 - an optimisation: any failure keeps the network as it is
        log.warning("the network's batch norms are not folded (%s: %s)", type(error).__name__, error)
    return network


def _same_function(network: torch.nn.Module, folded: torch.nn.Module) -> bool:
    """Whether two networks agree, to float32 rounding, on a small random input (float32 copies on
    the CPU: a GPU's TF32 convolutions would differ by more than the fold)."""
    in_channels = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    x = torch.rand((1, in_channels, 64, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = copy.deepcopy(network).float().cpu()(x)
        got = copy.deepcopy(folded).float().cpu()(x)
    return bool(torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()) + 1e-5))
