"""Which model each image of a `segment` run goes to, and at which scale (decided by the driver
before the images are dispatched, so that every engine runs the same units).

* **Model.** ``--model auto`` (the default) loads every shipped bundle and sends each image to
  the one that ``serves`` its kind (:mod:`nucleibatch.modality`, from the image's overview):
  fluorescence and unstained (grey) brightfield to ``default``, stained brightfield (H&E, IHC)
  to ``he``. ``--model NAME|BUNDLE`` sends every image to that one bundle.
* **Scale** (:mod:`nucleibatch.scale`): from the image's pixel size (its metadata, or
  ``--pixel-size``) and the bundle's, or from the nucleus diameter (``--diameter PX``, or
  ``--diameter auto``: estimated by segmenting the densest window of the image twice).

The decision is written into the image's :class:`~nucleibatch.io.discover.ImageRecord`
(``modality``, ``model``, ``pixel_size_um``, ``scale``), which travels with the image to every
worker and into ``images.parquet``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from ..channels import resolve_channel
from ..errors import ImageReadError, UsageError, is_fatal
from ..io.discover import ImageRecord
from ..io.readers import ImageSource, open_source
from ..modality import IMAGE_KINDS, classify_modality
from ..model.bundle import SHIPPED_BUNDLES, load_model
from ..model.predict import NucleiModel
from ..normalize import normalise_pixels, stats_for_bundle
from ..scale import AUTO_PULL, resample_scale
from .array import ESTIMATE_WINDOW, densest_window, estimate_diameter

log = logging.getLogger(__name__)
AUTO = "auto"
# images decided at once (their overviews are read in threads: most of the time is I/O and decoding)
CHOOSE_THREADS = 4


@dataclass
class ModelSet:
    """The models of a run, by name (the ``--model`` value, or a shipped bundle's name), and
    which one each image kind (:data:`~nucleibatch.modality.IMAGE_KINDS`) goes to (empty: one
    model takes every image)."""

    models: dict[str, NucleiModel]
    routes: dict[str, str]

    @property
    def first(self) -> NucleiModel:
        return next(iter(self.models.values()))

    def name_for(self, kind: str | None) -> str:
        """The model an image of ``kind`` goes to (None: unknown, the first model)."""
        if self.routes and kind in self.routes:
            return self.routes[kind]
        return next(iter(self.models))

    def describe(self) -> list[dict]:
        """One entry per model for run.json: name, bundle name, sha256, path, the image kinds routed to it."""
        return [
            {
                "name": name,
                "bundle": model.name,
                "sha256": model.sha256,
                "path": str(model.path),
                "serves": sorted(kind for kind, routed in self.routes.items() if routed == name),
                "licence": model.config.licence_name,
                "postprocess": model.postprocess.to_dict(),
            }
            for name, model in self.models.items()
        ]


def load_models(spec: str | NucleiModel, device: str = "auto", precision: str = "auto") -> ModelSet:
    """The models of a run: every shipped bundle, routed by image kind, for ``auto``; else the one
    bundle ``spec`` names (``default``, another shipped name, a bundle folder, or a loaded model).

    Raises:
        ModelBundleError: a bundle that cannot be loaded.
    """
    if isinstance(spec, NucleiModel):
        return ModelSet({str(spec.path or spec.name): spec}, {})
    if spec != AUTO:
        return ModelSet({str(spec): load_model(spec, device=device, precision=precision)}, {})
    models = {name: load_model(name, device=device, precision=precision) for name in SHIPPED_BUNDLES}
    routes: dict[str, str] = {}
    for name, model in models.items():
        for kind in model.config.serves:
            routes.setdefault(kind, name)
    missing = [kind for kind in IMAGE_KINDS if kind not in routes]
    if missing:
        raise UsageError(f"the shipped bundles serve no model for {', '.join(missing)} images; reinstall the package, or give --model")
    return ModelSet(models, routes)


def choose_all(records: Sequence[ImageRecord], models: ModelSet, channel: int | str | None = None, invert: str | None = None, pixel_size: float | None = None, diameter: float | str | None = None) -> list[ImageRecord]:
    """:func:`choose` for every record (in threads), in order."""
    if not records:
        return []
    with ThreadPoolExecutor(max_workers=CHOOSE_THREADS, thread_name_prefix="nb-choose") as pool:
        return list(pool.map(lambda record: choose(record, models, channel, invert, pixel_size, diameter), records))


def choose(record: ImageRecord, models: ModelSet, channel: int | str | None = None, invert: str | None = None, pixel_size: float | None = None, diameter: float | str | None = None) -> ImageRecord:
    """The record with its modality, model and scale decided (see the module docstring).

    An image that cannot be read here keeps the first model and scale 1: the run then fails it
    with its reason, as any unreadable image. ``channel``: ``--channel``, an index or a name
    (resolved against the record's channel names; discovery failed the records without it).
    """
    pixel = pixel_size if pixel_size is not None else record.pixel_size_um
    if record.error:
        return replace(record, pixel_size_um=pixel, model=models.name_for(None))
    try:
        channel = resolve_channel(channel, record.channel_names, record.channels)
    except ImageReadError as error:  # a record not checked by discovery: the run fails it with this reason
        return replace(record, pixel_size_um=pixel, model=models.name_for(None), error=str(error))
    modality = kind = None
    found_diameter = None if diameter in (None, AUTO) else float(diameter)
    if models.routes or diameter == AUTO:
        try:
            source = open_source(record)
        except Exception as error:  # the run reports it as this image's failure
            log.debug("%s: not read to choose its model (%s)", record.source, error)
            return replace(record, pixel_size_um=pixel, model=models.name_for(None))
        try:
            overview = source.overview()
            if models.routes:
                evidence = classify_modality(overview, channel)
                modality, kind = evidence.modality, evidence.kind
            if diameter == AUTO:
                try:
                    found_diameter = image_diameter(source, overview, models.models[models.name_for(kind)], channel, invert)
                except Exception as error:  # noqa: BLE001 - the image is still segmented, at its pixel size's scale
                    if is_fatal(error):
                        raise
                    log.warning("%s: nucleus diameter not estimated (%s: %s); its scale comes from its pixel size", record.source, type(error).__name__, error)
        except Exception as error:
            if is_fatal(error):
                raise
            log.debug("%s: not read to choose its model (%s)", record.source, error)
            return replace(record, pixel_size_um=pixel, modality=modality, model=models.name_for(kind))
        finally:
            source.close()
    name = models.name_for(kind)
    scale = resample_scale(models.models[name].config.scale, pixel, found_diameter, AUTO_PULL if diameter == AUTO else 1.0)
    return replace(record, pixel_size_um=pixel, modality=modality, model=name, scale=scale)


def image_diameter(source: ImageSource, overview, model: NucleiModel, channel: int | None, invert: str | None) -> float | None:
    """``--diameter auto`` for one image: :func:`~nucleibatch.segment.array.estimate_diameter` on
    the window of at most ``ESTIMATE_WINDOW``² full-resolution pixels where the overview is densest,
    normalised with the whole image's statistics."""
    stats = stats_for_bundle(overview, model.config.normalization, invert, channel)
    height, width = source.shape
    step = max(height / overview.shape[0], width / overview.shape[1])
    y0, y1, x0, x1 = densest_window(normalise_pixels(overview, stats, channel), max(1, int(ESTIMATE_WINDOW / step)))
    fy, fx = height / overview.shape[0], width / overview.shape[1]
    cy, cx = (y0 + y1) / 2 * fy, (x0 + x1) / 2 * fx
    half = ESTIMATE_WINDOW // 2
    top = int(min(max(0, cy - half), max(0, height - ESTIMATE_WINDOW)))
    left = int(min(max(0, cx - half), max(0, width - ESTIMATE_WINDOW)))
    window = source.read(top, min(height, top + ESTIMATE_WINDOW), left, min(width, left + ESTIMATE_WINDOW))
    return estimate_diameter(window, model, channel, invert, stats)
