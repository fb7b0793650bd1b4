"""`nucleibatch verify`: check that a segment output's finished images are whole (nucleibatch.verify)."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The ``verify`` subcommand's arguments; it runs :func:`run`."""
    p = subparsers.add_parser(
        "verify",
        help="check that the outputs of every finished image of a segment output are whole",
        description="Compare what each finished image wrote (listed in its completion record: every file of "
        "its masks.zarr group and its nuclei part, with sizes) with what OUT holds now. Exit 0: all whole; "
        "3: damaged images found (re-run `segment ... --verify` to redo them).",
    )
    p.set_defaults(func=run)
    p.add_argument("out", metavar="OUT", help="the -o folder (or store URL) of a `nucleibatch segment` run")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``nucleibatch verify`` from parsed arguments; prints the result; returns 0 when every
    finished image is whole, 3 when some are damaged."""
    from ..verify import verify_output

    report = verify_output(args.out)
    if args.json:
        damaged = [{"image_id": d.image_id, "problems": d.problems} for d in report.damaged]
        print(json.dumps({"checked": report.checked, "damaged": damaged, "unverifiable": report.unverifiable, "tables": report.table_problems}))
    else:
        print("\n".join(report.lines()))
    return 0 if report.intact else 3
