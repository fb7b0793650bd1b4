"""`nucleibatch segment` argument parsing (the job itself is in nucleibatch.pipeline)."""

from __future__ import annotations


def add_segment(subparsers) -> None:
    p = subparsers.add_parser("segment", help="segment image collections into OME-Zarr masks and tables")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("-o", "--output", required=True, metavar="OUT")


def run_segment(args) -> int:
    from .errors import UsageError

    raise UsageError("segment is not built yet")
