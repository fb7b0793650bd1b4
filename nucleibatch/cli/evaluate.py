"""`nucleibatch evaluate`: arguments, the call of the evaluation (nucleibatch.evaluate) and its printed scores."""

from __future__ import annotations

import argparse
import json

from ..channels import parse_channel
from ..errors import UsageError
from ..model.config import PRECISIONS
from ..segment.settings import INSTANCES_ON, TTA_CHOICES, resolve_instances_on


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The ``evaluate`` subcommand's arguments; it runs :func:`run`."""
    p = subparsers.add_parser(
        "evaluate",
        help="DSB metric of a model on annotated folders",
        description="Segment annotated images with exactly the inference and post-processing of `segment` "
        "and report the DSB 2018 metric: mean over images of the mean over IoU thresholds 0.50..0.95 of "
        "TP/(TP+FP+FN), plus AP@0.5, AP@0.75 and F1@0.5.",
    )
    p.set_defaults(func=run)
    p.add_argument("data", nargs="+", metavar="DATA", help="annotated folder(s): DSB layout or images/ + labels/")
    p.add_argument("--model", default="auto", help="auto: each image to the shipped model of its modality, as segment does; or one model: default, he, or a bundle folder [auto]")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda [auto]")
    p.add_argument("--invert", default=None, choices=("auto", "never", "always"), help="invert intensities, as segment's [the model's]")
    p.add_argument("--pixel-size", type=float, default=None, metavar="UM", help="micrometres per pixel of every image, as segment's [from each file's metadata]")
    p.add_argument("--diameter", default=None, metavar="PX|auto", help="nucleus diameter in the images' pixels, or auto (estimated per image), as segment's")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="network arithmetic, as segment's [auto: bf16 on CUDA and on CPUs with native bf16]")
    p.add_argument(
        "--channel",
        type=parse_channel,
        default=None,
        metavar="INDEX|NAME",
        help="the nuclear-stain channel, as segment's: an index, or a channel name from the images' metadata (OME-TIFF, "
        "OME-Zarr, a segment OUT's image copies); an image without it stops the evaluation (exit 2) naming its channels [mean of colours]",
    )
    p.add_argument("--csv", default=None, help="write per-image scores to this CSV file")
    p.add_argument("--limit-images", type=int, default=0, help="evaluate only the first K images")
    p.add_argument("--ids-from-bundle", action="store_true", help="evaluate only the validation images recorded in the bundle's config (with --model auto: in any shipped bundle's)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad annotations with a warning")
    p.add_argument("--tta", default="auto", choices=TTA_CHOICES, help="average predictions over 4 flips [the model's setting]")
    p.add_argument("--instances-on", default="auto", choices=INSTANCES_ON, help="where probabilities become nuclei, as segment's: cpu (watershed) or device (torch, on the network's device: the GPU, or the CPU where the network runs there) [auto: device on CUDA, else cpu]")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``nucleibatch evaluate`` from parsed arguments: prints the scores (one line, then one per
    modality; or JSON), writes the per-image CSV when asked; returns 0."""
    from dataclasses import replace

    from ..evaluate import evaluate_model, write_rows_csv
    from ..scale import check_diameter, check_pixel_size
    from ..segment.choose import load_models

    diameter = check_diameter(args.diameter)
    check_pixel_size(args.pixel_size)
    models = load_models(args.model, device=args.device, precision=args.precision)
    for model in models.models.values():
        if args.tta != "auto":
            model.config = replace(model.config, tta=args.tta == "on")
    image_ids = None
    if args.ids_from_bundle:
        image_ids = sorted({i for model in models.models.values() for i in model.config.training.get("val_image_ids") or []})
        if not image_ids:
            raise UsageError(f"--ids-from-bundle: the bundle {args.model} records no validation image ids")
    instances_on = resolve_instances_on(args.instances_on, models.first.device.type)
    summary, rows = evaluate_model(
        models, args.data, limit_images=args.limit_images, skip_bad=args.skip_bad, image_ids=image_ids, channel=args.channel,
        instances_on=instances_on, invert=args.invert, pixel_size=args.pixel_size, diameter=diameter,
    )  # fmt: skip
    if args.csv:
        write_rows_csv(rows, args.csv)
    if args.json:
        print(json.dumps(summary))
        return 0
    names = ", ".join(model.name for model in models.models.values())
    print(
        f"{summary['n_images']} images: mAP@[.5:.95] {summary['map']:.4f}  AP@0.5 {summary['ap50']:.4f}  "
        f"AP@0.75 {summary['ap75']:.4f}  F1@0.5 {summary['f1_50']:.4f}  (model {names}, instances on {instances_on})"
    )
    for modality, scores in summary["by_modality"].items():
        print(
            f"  {modality:<12} {scores['n_images']:>4} images: mAP@[.5:.95] {scores['map']:.4f}  AP@0.5 {scores['ap50']:.4f}  "
            f"AP@0.75 {scores['ap75']:.4f}  F1@0.5 {scores['f1_50']:.4f}"
        )
    return 0
