"""`nucleibatch train`: arguments and the call of training (nucleibatch.training.run)."""

from __future__ import annotations

import argparse
import json

from ..model.config import PRECISIONS
from ..normalize import INPUTS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The ``train`` subcommand's arguments; it runs :func:`run`."""
    p = subparsers.add_parser(
        "train",
        help="train the nuclei U-Net data-parallel with Ray Train",
        description="Train (or resume training of) the nuclei U-Net with Ray Train's TorchTrainer on "
        "annotated folders (DSB layout or images/ + labels/), keeping checkpoints, metrics.csv and "
        "curves.png (and validation overlays under overlays/) under RUN_DIR and exporting the best "
        "checkpoint as RUN_DIR/bundle. Running the same command again on the same RUN_DIR resumes from "
        "the latest checkpoint. --init fine-tunes a bundle instead of training from scratch.",
    )
    p.set_defaults(func=run)
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


def run(args: argparse.Namespace) -> int:
    """Run ``nucleibatch train`` from parsed arguments; prints the summary and the bundle; returns 0."""
    from ..training.run import TrainSettings, run_training

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

