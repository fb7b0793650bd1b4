"""`nucleibatch report`: (re)build a segment output's QC report (nucleibatch.report)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The ``report`` subcommand's arguments; it runs :func:`run`."""
    p = subparsers.add_parser(
        "report",
        help="(re)build OUT/report.html, a self-contained QC report of a segment output",
        description="Write OUT/report.html from OUT alone: run summary, outlines on a sample of images, "
        "the images with the fewest and the most nuclei, histograms of the measurements, the failed "
        "images and their reasons. One HTML file with everything embedded: it opens offline.",
    )
    p.set_defaults(func=run)
    p.add_argument("out", metavar="OUT", help="the -o folder of `nucleibatch segment`")


def run(args: argparse.Namespace) -> int:
    """Run ``nucleibatch report`` from parsed arguments; prints the report's path; returns 0."""
    from ..report import write_report

    print(f"report: {write_report(args.out)}")
    return 0
