"""The `segment` job, its settings, the steps of an image and the engines that schedule them.

* :mod:`.job`: :func:`run_segment_job`, the whole job (discovery, resume, engine, tables, run.json).
* :mod:`.settings`: :class:`SegmentSettings` (what changes results; recorded in OUT) and
  :class:`JobOptions` (how the job runs).
* :mod:`.plan`, :mod:`.steps`, :mod:`.stitch`, :mod:`.rows`: an image's plan, its steps, its last
  step (paint, tables, pyramids) and its rows; :mod:`.units` wraps the steps as work units.
* :mod:`.host_steps`, :mod:`.device_steps`: the two implementations of a block's way from its
  pixels to its owned nuclei (on the host; on the network's device), sharing :mod:`.prediction`.
* :mod:`.engines`: local, Ray and Dask, behind :class:`~.engines.Engine`; one driver for all.
* :mod:`.array`: one in-memory image (``evaluate``), with the same steps.
* :mod:`.resume`, :mod:`.summary`, :mod:`.timer`: what a rerun redoes; what a run reports.

Importing this package imports neither torch nor an engine.
"""

from __future__ import annotations

from .job import run_segment_job
from .settings import JobOptions, SegmentSettings
from .summary import RunSummary, closing_summary

__all__ = ["JobOptions", "RunSummary", "SegmentSettings", "closing_summary", "run_segment_job"]
