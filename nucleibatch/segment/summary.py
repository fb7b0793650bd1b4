"""What a finished run reports: progress while it runs, run.json's figures, the closing lines."""

from __future__ import annotations

import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..io.location import Location
from ..output.folder import OutputFolder

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a finished run reports (also written to run.json)."""

    out_dir: Location
    n_images: int
    n_ok: int
    n_failed: int
    n_nuclei: int
    n_resumed: int
    wall_seconds: float
    megapixels: float
    run: dict[str, Any] = field(default_factory=dict)
    nothing_done: bool = False  # every image was done before: run.json keeps the earlier run's figures

    @property
    def exit_code(self) -> int:
        return 0 if self.n_failed == 0 else 3


class Progress:
    """A tqdm bar (images, nuclei, MPix/s) on a terminal; a log line every 30 s otherwise."""

    def __init__(self, total: int, done: int, enabled: bool | None = None) -> None:
        self.total, self.done, self.nuclei, self.failed, self.pixels = total, done, 0, 0, 0.0
        self.started = self.last_log = time.perf_counter()
        self.bar = None
        if enabled if enabled is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="img", desc="segment", dynamic_ncols=True)

    def update(self, row: dict[str, Any]) -> None:
        self.done += 1
        self.nuclei += int(row.get("n_nuclei") or 0)
        self.failed += row["status"] != "ok"
        self.pixels += float((row.get("height") or 0) * (row.get("width") or 0))
        rate = self.pixels / 1e6 / max(time.perf_counter() - self.started, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix(nuclei=self.nuclei, failed=self.failed, mpix_s=f"{rate:.2f}", refresh=False)
            self.bar.update(1)
        elif time.perf_counter() - self.last_log > 30 and self.done < self.total:  # the closing summary says the last
            log.info("%d/%d images, %d nuclei, %d failed, %.2f MPix/s", self.done, self.total, self.nuclei, self.failed, rate)
            self.last_log = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def package_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"nucleibatch": __version__, "python": platform.python_version()}
    for package in ("torch", "segmentation-models-pytorch", "numpy", "zarr", "scikit-image", "tifffile", "pyarrow", "ray", "dask"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def device_peak_bytes(device) -> int | None:
    """Most memory torch held on a CUDA device during the run (None on the CPU): what
    ``--batch-size`` and ``--block-size`` bound, whatever the images' sizes."""
    if device.type != "cuda":
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(device))


def scale_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How the run's images were scaled for their models: how many were resampled, the range of
    factors, and how many had a known pixel size."""
    scales = [float(r["scale"]) for r in rows if r.get("scale") is not None]
    resampled = [s for s in scales if s != 1.0]
    return {
        "images_resampled": len(resampled),
        "min": min(resampled) if resampled else None,
        "max": max(resampled) if resampled else None,
        "images_with_pixel_size": sum(r.get("pixel_size_um") is not None for r in rows),
    }


def placement_summary(placement: list[dict[str, Any]]) -> dict[str, Any]:
    """Block units per worker of this run (distributed engines; every unit is listed in
    OUT/.nucleibatch/placement.jsonl)."""
    by_worker: dict[str, dict[str, int]] = {}
    for unit in placement:
        for role in ("predict_worker", "finish_worker"):
            worker = str(unit.get(role)).split("/pid:")[0]  # per Ray node / Dask worker
            by_worker.setdefault(worker, {"predict": 0, "finish": 0})[role.removesuffix("_worker")] += 1
    return {"block_units": len(placement), "workers": by_worker}


def closing_summary(summary: RunSummary) -> str:
    """The lines printed at the end of a run: counts, where the outputs are, how to open them."""
    out = summary.out_dir
    folder = OutputFolder(out)
    if summary.nothing_done:
        return (
            f"nothing to do: the {summary.n_images} images were done by an earlier run ({summary.n_failed} failed), "
            f"{summary.n_nuclei} nuclei; its figures are in {folder.run_json}"
        )
    lines = [
        f"segmented {summary.n_ok}/{summary.n_images} images ({summary.n_failed} failed, {summary.n_resumed} done by an earlier run), "
        f"{summary.n_nuclei} nuclei, {summary.wall_seconds:.1f} s, {summary.run.get('mpix_per_s') or 0:.2f} MPix/s",
        f"  labels (OME-Zarr): {folder.masks}   napari: napari --plugin napari-ome-zarr {folder.masks}/<store_path>",
        f"  per-image table:   {folder.images}   pandas: pd.read_parquet('{folder.images}')",
        f"  per-nucleus table: {folder.nuclei}   pandas: pd.read_parquet('{folder.nuclei}')",
        f"  run settings and figures: {folder.run_json}",
        f"  QC report (outlines, histograms, failures): {folder.report}",
    ]
    if summary.n_failed:
        lines.append(f"  failed images and reasons: pd.read_parquet('{folder.images}').query(\"status == 'failed'\")[['image_id', 'error']]")
    return "\n".join(lines)
