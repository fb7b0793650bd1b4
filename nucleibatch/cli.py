"""Command line: `nucleibatch segment | train | evaluate | report | export | verify` (thin: parses, then calls the library)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from . import __version__
from .channels import parse_channel
from .errors import NucleibatchError, UsageError
from .normalize import INPUTS
from .options import INSTANCES_ON, PRECISIONS, TTA_CHOICES, resolve_instances_on


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exits with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the nuclei U-Net data-parallel with Ray Train",
        description="Train (or resume training of) the nuclei U-Net with Ray Train's TorchTrainer on "
        "annotated folders (DSB layout or images/ + labels/), keeping checkpoints, metrics.csv and "
        "curves.png (and validation overlays under overlays/) under RUN_DIR and exporting the best "
        "checkpoint as RUN_DIR/bundle. Running the same command again on the same RUN_DIR resumes from "
        "the latest checkpoint. --init fine-tunes a bundle instead of training from scratch.",
    )
    p.add_argument("data", nargs="+", metavar="DATA", help="annotated folder(s)")
    p.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run folder (checkpoints, metrics, bundle)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP processes) [1]")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (DDP over nccl); default CPU (gloo)")
    p.add_argument("--engine", choices=("ray", "local"), default="ray", help="ray: Ray Train workers; local: this process on one device (CPU, or the GPU with --gpu), no Ray [ray]")
    p.add_argument("--loader-workers", type=int, default=-1, metavar="N", help="DataLoader processes per worker making augmented patches [0 on CPU, 4 with --gpu]")
    p.add_argument("--epochs", type=int, default=40, help="epochs [40]")
    p.add_argument("--batch-size", type=int, default=8, help="patches per worker per step [8]")
    p.add_argument("--patch-size", type=int, default=256, help="patch side in pixels, multiple of 32 [256]")
    p.add_argument("--patches-per-epoch", type=int, default=0, help="patches per epoch over all workers [one per training image]")
    p.add_argument("--encoder", default=None, help="smp encoder name [resnet18; with --init: the bundle's, and no other]")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW, warm-up + cosine) [2e-3; with --init 2e-4]")
    p.add_argument("--init", default=None, metavar="default|BUNDLE", help="fine-tune: start from this bundle's weights and architecture (a checkpoint in RUN_DIR still wins)")
    p.add_argument("--freeze-encoder-epochs", type=int, default=0, metavar="N", help="with --init: keep the encoder frozen (only decoder and head learn) for the first N epochs [0]")
    p.add_argument("--overlay-every", type=int, default=1, metavar="N", help="RUN_DIR/overlays/epoch_XXX.png (predicted vs true outlines of 3 validation images) every N epochs; 0: none [1]")
    p.add_argument("--tensorboard", action="store_true", help="also write a TensorBoard log to RUN_DIR/tensorboard (metrics and overlays per epoch)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of images kept for validation [0.1]")
    p.add_argument("--val-images", default=None, metavar="FILE", help="validation images: a text file of image ids, one per line (replaces --val-fraction; validate on whole images or tiles, never on patches of training images)")
    p.add_argument("--input", default=None, choices=INPUTS, help="the network's input channel: grey (mean of colours; fluorescence, brightfield) or haematoxylin (colour deconvolution; H&E and other stained tissue) [grey; with --init: the bundle's]")
    p.add_argument("--pixel-size", type=float, default=None, metavar="UM", help="pixel size of DATA in micrometres, recorded in the bundle as the scale it was trained at (segment resamples images of known pixel size to it)")
    p.add_argument("--stain-jitter", type=float, default=None, metavar="S", help="stain augmentation of the haematoxylin input: the stain vector's weights jittered by S [0.1 with --input haematoxylin]")
    p.add_argument("--blur", type=float, default=0.0, metavar="P", help="probability of a Gaussian blur (sigma 0.5-1.5 px) per patch [0]")
    p.add_argument("--scale-jitter", type=float, nargs=2, default=(0.6, 1.6), metavar=("LOW", "HIGH"), help="range of the random zoom of patches; narrow it for data of one known magnification [0.6 1.6]")
    p.add_argument("--licence", default=None, metavar="NAME", help="licence of DATA (e.g. CC0-1.0, CC-BY-NC-SA-4.0), recorded in the bundle: a model inherits its training data's terms")
    p.add_argument("--citation", default=None, metavar="TEXT", help="how to cite DATA, recorded in the bundle")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="training arithmetic: auto = bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX; speed in docs/performance.md), else float32 [auto]")
    p.add_argument("--limit-images", type=int, default=0, help="use only the first K images (smoke runs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (split, patches) [0]")
    p.add_argument("--skip-bad", action="store_true", help="skip bad annotations with a warning instead of stopping")
    p.add_argument("--cpus-per-worker", type=float, default=0, help="CPUs per worker [the machine's CPUs / workers]")
    p.add_argument("--max-failures", type=int, default=3, help="worker failures survived by resuming from the last checkpoint [3]")
    p.add_argument("--no-tune", action="store_true", help="keep default post-processing thresholds instead of tuning them on validation")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a private local Ray)")
    p.add_argument("--overwrite", action="store_true", help="delete RUN_DIR's previous run and start over")


def _add_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="DSB metric of a model on annotated folders",
        description="Segment annotated images with exactly the inference and post-processing of `segment` "
        "and report the DSB 2018 metric: mean over images of the mean over IoU thresholds 0.50..0.95 of "
        "TP/(TP+FP+FN), plus AP@0.5, AP@0.75 and F1@0.5.",
    )
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
    p.add_argument("--instances-on", default="auto", choices=INSTANCES_ON, help="where probabilities become nuclei, as segment's: cpu (watershed) or device (torch) [auto: device on CUDA, else cpu]")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="(re)build OUT/report.html, a self-contained QC report of a segment output",
        description="Write OUT/report.html from OUT alone: run summary, outlines on a sample of images, "
        "the images with the fewest and the most nuclei, histograms of the measurements, the failed "
        "images and their reasons. One HTML file with everything embedded: it opens offline.",
    )
    p.add_argument("out", metavar="OUT", help="the -o folder of `nucleibatch segment`")


def _run_report(args) -> int:
    from .report import write_report

    print(f"report: {write_report(args.out)}")
    return 0


def _add_verify(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check that the outputs of every finished image of a segment output are whole",
        description="Compare what each finished image wrote (listed in its completion record: every file of "
        "its masks.zarr group and its nuclei part, with sizes) with what OUT holds now. Exit 0: all whole; "
        "3: damaged images found (re-run `segment ... --verify` to redo them).",
    )
    p.add_argument("out", metavar="OUT", help="the -o folder (or store URL) of a `nucleibatch segment` run")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_verify(args) -> int:
    from .verify import verify_output

    report = verify_output(args.out)
    if args.json:
        damaged = [{"image_id": d.image_id, "problems": d.problems} for d in report.damaged]
        print(json.dumps({"checked": report.checked, "damaged": damaged, "unverifiable": report.unverifiable, "tables": report.table_problems}))
    else:
        print("\n".join(report.lines()))
    return 0 if report.intact else 3


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nucleibatch", description="Nuclei segmentation of microscopy archives.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"nucleibatch {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    from .segment_cli import add_segment

    add_segment(subparsers)
    _add_train(subparsers)
    _add_evaluate(subparsers)
    from .export import add_export

    add_export(subparsers)
    _add_report(subparsers)
    _add_verify(subparsers)
    return parser


def _run_train(args) -> int:
    from .training.run import TrainSettings, run_training

    settings = TrainSettings(
        data=list(args.data),
        run_dir=args.output,
        workers=args.workers,
        gpu=args.gpu,
        engine=args.engine,
        loader_workers=args.loader_workers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        patches_per_epoch=args.patches_per_epoch,
        encoder=args.encoder,
        learning_rate=args.lr,
        val_fraction=args.val_fraction,
        val_images=args.val_images,
        input=args.input,
        pixel_size=args.pixel_size,
        stain_jitter=args.stain_jitter,
        blur=args.blur,
        scale_jitter=tuple(args.scale_jitter),
        precision=args.precision,
        licence=args.licence,
        citation=args.citation,
        limit_images=args.limit_images,
        seed=args.seed,
        skip_bad=args.skip_bad,
        cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures,
        tune_postprocess=not args.no_tune,
        address=args.address,
        init=args.init,
        freeze_encoder_epochs=args.freeze_encoder_epochs,
        overlay_every=args.overlay_every,
        tensorboard=args.tensorboard,
    )
    summary = run_training(settings, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    print(f"bundle: {summary['bundle']}  (use it with: nucleibatch segment INPUT -o OUT --model {summary['bundle']})")
    return 0


def _run_evaluate(args) -> int:
    from dataclasses import replace

    from .choose import load_models
    from .evaluate import evaluate_model, write_rows_csv
    from .scale import check_diameter, check_pixel_size

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


# after SIGTERM, how long the command may take to stop cleanly (images in flight are then left to
# the next run, which redoes them)
STOP_GRACE_S = 30.0


class Terminated(KeyboardInterrupt):
    """SIGTERM (how SLURM, Kubernetes and systemd stop a job): stops the command as Ctrl-C does."""


@contextlib.contextmanager
def stop_on_sigterm(command: str) -> Iterator[None]:
    """While the command runs, SIGTERM raises :class:`Terminated` in the main thread; if the
    command has not stopped :data:`STOP_GRACE_S` later (or a second SIGTERM comes), the process
    exits with status 1 at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    timers: list[threading.Timer] = []

    def exit_now(reason: str) -> None:
        try:  # os.write: no buffered stream that a closed stderr or a reentrant print could break
            os.write(2, f"nucleibatch {command}: stopped: {reason}; finished work is kept, re-run the same command to resume\n".encode())
        finally:
            os._exit(1)

    def on_sigterm(signum, frame) -> None:
        if timers:
            exit_now("a second SIGTERM")
        timer = threading.Timer(STOP_GRACE_S, exit_now, args=(f"SIGTERM, and images still in flight after {STOP_GRACE_S:.0f} s",))
        timer.daemon = True
        timers.append(timer)
        timer.start()
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        for timer in timers:  # stopped in time: no exit later
            timer.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nucleibatch` console script; returns the exit status."""
    from .allocator import tune_allocator

    tune_allocator()  # before any thread starts: see nucleibatch/allocator.py
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with stop_on_sigterm(args.command):
            return _run_command(args)
    except NucleibatchError as error:
        print(f"nucleibatch {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError as error:
        if not stdout_reader_gone():
            return _stopped(args.command, error)
        # the reader of our output left (`nucleibatch verify OUT | head -1`): quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 1
    except OSError as error:  # disk full, output not writable, ...: the run stops, what is done stays
        return _stopped(args.command, error)
    except KeyboardInterrupt as stop:
        cause = "SIGTERM" if isinstance(stop, Terminated) else "interrupted (Ctrl-C)"
        print(f"nucleibatch {args.command}: stopped: {cause} (finished work is kept; re-run the same command to resume)", file=sys.stderr)
        return 1


def _stopped(command: str, error: OSError) -> int:
    print(f"nucleibatch {command}: stopped: {error} (finished work is kept; fix the cause and re-run to resume)", file=sys.stderr)
    return 1


def stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end was closed (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _run_command(args) -> int:
    """Run the parsed subcommand; returns its exit status."""
    if args.command == "train":
        return _run_train(args)
    if args.command == "evaluate":
        return _run_evaluate(args)
    if args.command == "export":
        from .export import run_export

        return run_export(args)
    if args.command == "report":
        return _run_report(args)
    if args.command == "verify":
        return _run_verify(args)
    from .segment_cli import run_segment

    return run_segment(args)


if __name__ == "__main__":
    sys.exit(main())
