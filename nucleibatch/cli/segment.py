"""`nucleibatch segment`: arguments and the call of the job (nucleibatch.segment)."""

from __future__ import annotations

import argparse
import json

from ..channels import parse_channel
from ..model.config import PRECISIONS
from ..segment.settings import INSTANCES_ON, TTA_CHOICES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The ``segment`` subcommand's arguments; it runs :func:`run`."""
    p = subparsers.add_parser(
        "segment",
        help="segment image collections and whole slides into OME-Zarr masks and tables",
        description="Find nuclei in every image under INPUT (folders, DSB layout, PNG/JPEG/TIFF, multi-page "
        "and pyramidal (OME-)TIFF/SVS, zarr/OME-Zarr, or a manifest listing paths) and write OUT/masks.zarr "
        "(OME-Zarr labels), OUT/nuclei.parquet, OUT/images.parquet and OUT/run.json. Re-running the same "
        "command resumes. Exit status: 0 all images ok, 3 some failed (listed in images.parquet), 2 usage "
        "error, 1 the run stopped.",
    )
    p.set_defaults(func=run)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, zarr stores or manifest files: paths, file:// URLs, or object-store URLs such as s3://bucket/plates (install nucleibatch[s3], or gcsfs / adlfs)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder: a path, file:// URL or object-store URL such as s3://bucket/out")
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="segment only the files (or zarr stores) this shell-style pattern matches, against their path relative to the INPUT folder "
        "(B02/A01_s1_w1.tif) or their name; repeatable (any may match); a pattern matching nothing is an error. E.g. --include '*_w1.tif' "
        "for the nuclear channel of a one-file-per-channel export. A rerun with another filter adds what it matches to OUT [all files]",
    )
    p.add_argument("--model", default="auto", help="auto: each image to the shipped model of its modality (fluorescence and grey brightfield: default; H&E and stained tissue: he); or one model for every image: default, he, or a bundle folder [auto]")
    p.add_argument("--pixel-size", type=float, default=None, metavar="UM", help="micrometres per pixel of every input, overriding the files' metadata (OME, SVS MPP, TIFF resolution, OME-Zarr scale); images are resampled to their model's scale [from each file]")
    p.add_argument("--diameter", default=None, metavar="PX|auto", help="typical nucleus diameter in the inputs' pixels; images are resampled so that it matches their model's (it wins over --pixel-size); auto: estimated per image by segmenting its densest 1024x1024 window twice [off: the pixel size decides, else none]")
    p.add_argument("--engine", default="local", choices=("local", "ray", "dask"), help="scheduler [local]")
    p.add_argument("--address", default=None, help="Ray or Dask scheduler address (ray/dask engines)")
    p.add_argument("--workers", type=int, default=0, help="model workers for ray/dask [ray: one per GPU, else half the CPUs; dask: the workers declaring GPU, else all]")
    p.add_argument("--post-workers", type=int, default=None, metavar="N", help="local engine: processes that post-process (watershed, measurements, writes) while this one runs the model; 0: threads of this process [on a GPU with --instances-on cpu: the usable CPUs (affinity, cgroup quota, SLURM_CPUS_PER_TASK) but two; else 0]")
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="GPUs per Ray model worker (0.5: two workers share a GPU) [1]")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda [auto: CUDA when present]")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="network arithmetic [auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), else float32]")
    p.add_argument(
        "--channel",
        type=parse_channel,
        default=None,
        metavar="INDEX|NAME",
        help="the nuclear-stain channel: an index (0, 1, ...) or a channel name from the files' metadata (OME-TIFF Channel Name, "
        "OME-Zarr omero label; exact, else the one case-insensitive match), resolved per image. An image without that channel "
        "fails (its images.parquet error lists its channels); a name no input has is a usage error (exit 2) [mean of colours]",
    )
    p.add_argument("--invert", default=None, choices=("auto", "never", "always"), help="invert intensities (bright background) [the model's: auto]")
    p.add_argument("--batch-size", type=int, default=4, help="network input per model call, in 512x512 tiles (a quarter as many 1024x1024 windows) [4]")
    p.add_argument("--tta", default="auto", choices=TTA_CHOICES, help="average predictions over 4 flips (4x slower) [the model's setting]")
    p.add_argument(
        "--instances-on",
        default="auto",
        choices=INSTANCES_ON,
        help="where probabilities become nuclei: cpu (scikit-image's watershed, in the post-processing threads or processes) or device "
        "(torch, next to the network, on --device: the GPU's, or the CPU when the network runs there; on a GPU it spares the CPU cores; "
        "both score alike, figures in docs/performance.md) [auto: device on CUDA, else cpu]",
    )
    p.add_argument("--block-size", type=int, default=2048, help="side of the blocks an image is processed in [2048]")
    p.add_argument("--block-margin", type=int, default=128, help="context around each block; must exceed a nucleus' size [128]")
    p.add_argument("--no-store-image", action="store_true", help="do not copy the image into masks.zarr (labels only)")
    p.add_argument("--retry-failed", action="store_true", help="on resume, redo images that failed before")
    p.add_argument("--overwrite", action="store_true", help="discard OUT's previous results and start over")
    p.add_argument("--verify", action="store_true", help="on resume, check the outputs of finished images (as `nucleibatch verify`) and redo damaged ones")
    p.add_argument("--progress", default="auto", choices=("auto", "bar", "log"), help="progress bar on a terminal, log lines otherwise [auto]")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``nucleibatch segment`` from parsed arguments; prints the closing summary (or run.json's
    content with --json); returns the job's exit status (0 all images ok, 3 some failed)."""
    from ..scale import check_diameter
    from ..segment.job import run_segment_job
    from ..segment.settings import JobOptions, SegmentSettings
    from ..segment.summary import closing_summary

    settings = SegmentSettings(
        block_size=args.block_size,
        block_margin=args.block_margin,
        channel=args.channel,
        invert=args.invert,
        store_image=not args.no_store_image,
        tta=None if args.tta == "auto" else args.tta == "on",
        instances_on=args.instances_on,
        pixel_size=args.pixel_size,
        diameter=check_diameter(args.diameter),
    )
    options = JobOptions(
        model=args.model,
        engine=args.engine,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        retry_failed=args.retry_failed,
        verify=args.verify,
        address=args.address,
        workers=args.workers,
        post_workers=args.post_workers,
        gpus_per_worker=args.gpus_per_worker,
        progress={"auto": None, "bar": True, "log": False}[args.progress],
        include=tuple(args.include),
    )
    summary = run_segment_job(list(args.inputs), args.output, settings, options)
    print(json.dumps(summary.run, indent=2) if args.json else closing_summary(summary))
    return summary.exit_code
