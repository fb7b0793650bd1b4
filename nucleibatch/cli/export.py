"""`nucleibatch export`: arguments and the call of the export (nucleibatch.export.export_run)."""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from ..export import FORMATS, export_run, failed_line
from ..io.location import is_remote, to_location


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The ``export`` subcommand's arguments; it runs :func:`run`."""
    p = subparsers.add_parser(
        "export",
        help="export a segment output as GeoJSON (QuPath), DSB RLE CSV, PNG or TIFF labels",
        description="Export the images of a finished `nucleibatch segment` output folder (OUT) whose status "
        "is 'ok': geojson = one QuPath-compatible FeatureCollection per image (pixel-edge outlines, "
        "measurements); dsb-rle = DSB 2018 submission.csv (ImageId,EncodedPixels); png = 16-bit label "
        "images; tiff = 32-bit zlib label images. Failed images are skipped and named.",
    )
    p.set_defaults(func=run)
    p.add_argument("out", metavar="OUT", help="the -o folder of a `nucleibatch segment` run")
    p.add_argument("--format", required=True, choices=FORMATS, dest="format", help="geojson | dsb-rle | png | tiff")
    p.add_argument("-o", "--output", default=None, metavar="DIR", help="folder to write [OUT/export/<format>]")
    p.add_argument("--images", nargs="+", default=None, metavar="ID", help="export only these image ids (put it after OUT, or end the list with --)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``nucleibatch export`` from parsed arguments; prints the summary; returns 0."""
    dest = to_location(args.output) if args.output else None
    if dest is not None and is_remote(dest):
        raise UsageError(f"-o {dest}: export writes to a local folder; copy the files to the store afterwards")
    summary = export_run(to_location(args.out), args.format, dest, args.images, progress=False if args.no_progress else None)
    if summary.failed:
        print(failed_line(summary.failed), file=sys.stderr)
    print(summary.line())
    return 0
