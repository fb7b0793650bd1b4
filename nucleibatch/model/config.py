"""The bundle config (``config.json`` of a model bundle): one typed, versioned record.

:class:`BundleConfig` is what the package reads; its field defaults are the one set of defaults,
those of a fresh network (:func:`default_config`). :func:`migrate` turns a config as some format
version wrote it into the current one: keys that a version's bundles may lack get the value that
the readers of that version assumed for them (which, for ``tile_size`` and ``decoder_channels``,
is not a fresh network's). Nested parts that other modules own stay plain dicts passed through:
``normalization`` (read by :func:`nucleibatch.normalize.stats_for_bundle`), ``postprocess``
(:class:`~nucleibatch.instances.InstanceParams`), ``scale`` (:func:`nucleibatch.scale.resample_scale`),
and the records ``training``, ``metrics``, ``init`` and ``licence``; treat them as read-only and
make a changed config with :func:`dataclasses.replace`.

No torch here: the post-processing processes import this module (through :mod:`nucleibatch.segment.units`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import ModelBundleError
from ..instances import InstanceParams
from ..normalize import check_input
from ..targets import TARGET_CLASSES
from ..tiling import DEFAULT_HALO, PAD_MULTIPLE

FORMAT_NAME = "nucleibatch-bundle"
FORMAT_VERSION = 1
BUNDLE_FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
WEIGHTS_NAME = "model.safetensors"  # a bundle's weights file, unless its config names another
REQUIRED_KEYS = ("encoder", "in_channels", "classes")
# written only when they hold something (a bundle that was never saved has no weights; a licence
# is recorded only when given)
OMITTED_WHEN_NONE = ("licence", "weights", "weights_dtype", "weights_sha256")

CLASS_MEANING = {
    "body": "probability that the pixel belongs to a nucleus",
    "contour": "probability that the pixel lies on the inner rim (2 px) of a nucleus",
    "contact": "probability that the pixel lies within 2 px of two different nuclei",
}

# What the readers of a version-1 config assumed for a key it lacks, where that differs from a
# fresh network's default: the networks and tiles such a bundle was evaluated with. Every reader
# fell back to 512-pixel windows (model prediction, the engines' batching of one-tile images),
# and the network builder to segmentation_models_pytorch's U-Net decoder.
V1_ABSENT = {"tile_size": 512, "decoder_channels": [256, 128, 64, 32, 16]}


def normalization_config(input: str = "grey") -> dict[str, Any]:
    """The bundle keys that follow from the network's input channel (:data:`nucleibatch.normalize.INPUTS`):
    ``normalization`` and the image kinds it ``serves`` (:data:`nucleibatch.modality.IMAGE_KINDS`)."""
    if check_input(input) == "haematoxylin":
        normalization = {
            "input": "haematoxylin",
            "grey": "haematoxylin density of the RGB channels (colour deconvolution, Ruifrok & Johnston), or the optical density of a single channel",
            "percentiles": [1.0, 99.8],
            "invert": "never",
            "range": "clip((x - p_low) / (p_high - p_low), 0, 1)",
        }
        return {"normalization": normalization, "serves": ["stained"]}
    normalization = {
        "input": "grey",
        "grey": "mean of the colour channels (RGB/RGBA), or the channel picked by --channel",
        "percentiles": [1.0, 99.8],
        "invert": "auto",
        "range": "clip((x - p_low) / (p_high - p_low), 0, 1); 1 - x when the background is bright",
    }
    return {"normalization": normalization, "serves": ["fluorescence", "brightfield"]}


def _class_meaning(classes: list[str]) -> dict[str, str]:
    return {name: CLASS_MEANING[name] for name in classes if name in CLASS_MEANING}


@dataclass(frozen=True, kw_only=True)
class BundleConfig:
    """A model bundle's config (see the README's model bundle section); fields in ``config.json``'s order.

    The defaults describe a fresh network: a 5-level U-Net with a ResNet-18 encoder, one grey
    input channel, the three classes of :data:`~nucleibatch.targets.TARGET_CLASSES`, 1024-pixel
    windows with a :data:`~nucleibatch.tiling.DEFAULT_HALO` halo.
    """

    name: str = "unnamed"
    architecture: str = "Unet"  # a segmentation_models_pytorch class (nucleibatch.model.network.ARCHITECTURES)
    encoder: str = "resnet18"  # a segmentation_models_pytorch encoder, or tu-<timm name>
    encoder_depth: int = 5
    decoder_channels: list[int] = field(default_factory=lambda: [128, 64, 32, 16, 16])  # Unet and UnetPlusPlus only
    encoder_weights: str | None = None  # pretrained encoder weights of a fresh network; None once it has its own
    in_channels: int = 1
    classes: list[str] = field(default_factory=lambda: list(TARGET_CLASSES))
    class_meaning: dict[str, str] = field(default_factory=lambda: _class_meaning(list(TARGET_CLASSES)))
    activation: str = "sigmoid"
    normalization: dict[str, Any] = field(default_factory=lambda: normalization_config("grey")["normalization"])
    serves: list[str] = field(default_factory=lambda: normalization_config("grey")["serves"])
    tile_size: int = 1024  # the network's window, pixels
    halo: int = DEFAULT_HALO  # context pixels around each window's core
    pad_multiple: int = PAD_MULTIPLE
    tta: bool = False  # flip test-time augmentation
    postprocess: dict[str, Any] = field(default_factory=lambda: InstanceParams().to_dict())
    units: str = "pixels"
    scale: dict[str, Any] = field(default_factory=lambda: {"nucleus_diameter_px": None, "pixel_size_um": None})
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] | None = None  # the bundle training started from (fine-tuning), None from scratch
    licence: dict[str, Any] | None = None
    weights: str | None = None  # the weights file's name, set by save_bundle
    weights_dtype: str | None = None
    weights_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are

    @property
    def input(self) -> str:
        """The network's input channel (:data:`nucleibatch.normalize.INPUTS`)."""
        return str(self.normalization.get("input", "grey"))

    @property
    def weights_file(self) -> str:
        """The name of the weights file in the bundle's folder."""
        return self.weights or WEIGHTS_NAME

    @property
    def postprocess_params(self) -> InstanceParams:
        """``postprocess`` as :class:`~nucleibatch.instances.InstanceParams` (unknown keys: UsageError)."""
        return InstanceParams.from_dict(self.postprocess)

    @property
    def licence_name(self) -> str | None:
        return (self.licence or {}).get("name")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BundleConfig:
        """A config as ``config.json`` holds it, of any format version (:func:`migrate`).

        Raises:
            ModelBundleError: a key every version requires is missing, or a newer format.
        """
        values = migrate(raw)
        known = {f.name for f in fields(cls)} - {"extra"}
        typed = {key: values[key] for key in known if key in values}
        for key in ("encoder_depth", "in_channels", "tile_size", "halo", "pad_multiple"):
            if key in typed:
                typed[key] = int(typed[key])
        if "tta" in typed:
            typed["tta"] = bool(typed["tta"])
        extra = {key: value for key, value in values.items() if key not in known and key != "format"}
        return cls(**copy.deepcopy(typed), extra=copy.deepcopy(extra))

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` form (a deep copy): ``format`` first, then the fields in order,
        then :attr:`extra`; :data:`OMITTED_WHEN_NONE` keys only when set."""
        out: dict[str, Any] = {"format": BUNDLE_FORMAT}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "extra" or (value is None and item.name in OMITTED_WHEN_NONE):
                continue
            out[item.name] = copy.deepcopy(value)
        out.update(copy.deepcopy(self.extra))
        return out


def format_version(format: Any) -> int:
    """The version of a config's ``format`` value; 1 for a config without one (the first format
    was never checked, so any other value is read as version 1 too)."""
    if isinstance(format, str) and format.startswith(FORMAT_NAME + "/") and format[len(FORMAT_NAME) + 1 :].isdigit():
        return int(format[len(FORMAT_NAME) + 1 :])
    return 1


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """A config of any format version as the current version writes it (a new dict).

    Version 1 (every bundle so far) grew keys over time; what a config lacks is what its
    readers assumed: :data:`V1_ABSENT`; ``serves`` from the input channel (older bundles
    wrote ``modalities``, which is dropped, as ``scripts/ship_bundle.py`` always did); a
    ``scale`` of None as none; anything else a fresh network's default (BundleConfig's fields).
    A later format adds its step here, after this one.

    Raises:
        ModelBundleError: a key every version requires is missing, or the format is newer than this package's.
    """
    version = format_version(raw.get("format"))
    if version > FORMAT_VERSION:
        raise ModelBundleError(f"config of format {raw.get('format')!r}, newer than this nucleibatch reads ({BUNDLE_FORMAT}); upgrade nucleibatch")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise ModelBundleError(f"config lacks {key!r}; re-export the bundle with `nucleibatch train`")
    config = {key: value for key, value in raw.items() if key != "modalities"}
    for key, value in V1_ABSENT.items():
        config.setdefault(key, copy.deepcopy(value))
    if config.get("scale") is None:
        config.pop("scale", None)
    if "serves" not in config:
        input = config.get("normalization", {}).get("input", "grey")
        config["serves"] = normalization_config(input)["serves"]
    if "class_meaning" not in config:
        config["class_meaning"] = _class_meaning(list(config["classes"]))
    config["format"] = BUNDLE_FORMAT
    return config


def default_config(encoder: str | None = None, architecture: str | None = None, tile_size: int | None = None, halo: int | None = None, input: str = "grey") -> BundleConfig:
    """A complete bundle config for a fresh network (see the README's model bundle section):
    :class:`BundleConfig`'s defaults where an argument is None, named after its architecture and
    encoder, normalised for ``input``."""
    chosen = {"encoder": encoder, "architecture": architecture, "tile_size": tile_size, "halo": halo}
    config = BundleConfig(**{key: value for key, value in chosen.items() if value is not None}, **normalization_config(input))
    return replace(config, name=f"nuclei-{config.architecture.lower()}-{config.encoder}")

PRECISIONS = ("auto", "float32", "bf16")
"""``--precision``: the network's arithmetic. ``auto`` is bf16 on CUDA and on CPUs with native bf16."""
