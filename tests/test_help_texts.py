"""What `--help` and the cluster/ files tell a user stays true: no retired flags, no measured
figures (they live, with their machine and date, in docs/performance.md), object stores named
where they work, and no claim about .ci/install that .ci/install does not bear out."""

from __future__ import annotations

import argparse
import re

import pytest

from nucleibatch.cli import build_parser
from tests.helpers.paths import REPO

CLUSTER_FILES = sorted(p for p in (REPO / "cluster").iterdir() if p.is_file())
RETIRED_FLAGS = ("--context",)  # removed from segment; OUTs recorded with it still resume
# a measured figure: a score with 3+ decimals (mAP 0.6361), or a measured speed-up (2.8x faster;
# "4 flips (4x slower)" is by design, not measured)
FIGURE = re.compile(r"\b0\.\d{3,}\b|\bmAP\s+\d|\d+\.\d+\s*x\b|\bpatches/s\b|MPix/s")


def help_texts() -> dict[str, str]:
    """`nucleibatch --help` and each subcommand's `--help`, as argparse prints them."""
    parser = build_parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"nucleibatch": parser.format_help(), **{name: sub.format_help() for name, sub in action.choices.items()}}


@pytest.mark.parametrize("command", ["nucleibatch", "segment", "train", "evaluate", "export", "report", "verify"])
def test_help_has_no_retired_flag_and_no_measured_figure(command):
    text = " ".join(help_texts()[command].split())  # argparse wraps lines
    for flag in RETIRED_FLAGS:
        assert not re.search(re.escape(flag) + r"\b", text), f"{command} --help names the removed {flag}"
    figures = FIGURE.findall(text)
    assert not figures, f"{command} --help cites figures {figures}; they belong in docs/performance.md"


def test_segment_help_says_inputs_and_out_may_be_object_store_urls():
    text = " ".join(help_texts()["segment"].split())
    assert "s3://bucket/plates" in text and "s3://bucket/out" in text and "nucleibatch[s3]" in text
    assert "not supported" not in text


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_files_name_no_retired_flag_and_do_not_deny_object_stores(path):
    text = " ".join(path.read_text().split())
    for flag in RETIRED_FLAGS:
        assert not re.search(re.escape(flag) + r"\b", text), f"cluster/{path.name} names the removed {flag}"
    denial = re.search(r"(object[- ]store|s3://|bucket).{0,60}?\b(not supported|not read or written|unsupported)", text, re.IGNORECASE)
    assert not denial, f"cluster/{path.name}: {denial[0]!r}; INPUT and OUT may be object-store URLs (tests/test_object_store.py)"


def test_cluster_files_claim_no_torch_index_of_ci_install():
    """A line that cites .ci/install for a torch index (whl/cu130, ...) holds only if .ci/install uses one."""
    ci_install = (REPO / ".ci" / "install").read_text()
    for path in CLUSTER_FILES:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for index in re.findall(r"whl/(cu\d+|cpu|rocm[\d.]+)", line):
                if ".ci/install" in line:
                    assert f"whl/{index}" in ci_install, f"cluster/{path.name}:{number} says .ci/install uses whl/{index}; it does not"
