"""The `segment` job: discovery, resume, engine, tables, run.json and the closing summary."""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .choose import choose_all, load_models
from .cpus import limit_torch_threads, usable_cpus
from .errors import UsageError
from .extras import require_extra
from .io.discover import ImageRecord, check_inputs_exist, discover_inputs
from .io.location import Location, exists, make_dirs, to_location
from .model.bundle import bundle_folder
from .model.device import resolve_device, resolve_device_name
from .model.predict import NucleiModel
from .options import resolve_instances_on
from .output.atomic import write_bytes_atomic
from .output.checkpoints import drop_finished
from .output.folder import OutputFolder
from .output.layout import assign_store_paths, layout_for_run, write_layout
from .output.lock import Lock
from .output.reader import read_run
from .output.state import (
    append_placement,
    check_settings,
    clear_outputs,
    overwrite_under_way,
    recorded_settings,
)
from .output.store import open_root, store_name
from .output.tables import (
    finish_nuclei_dataset,
    read_records,
    remove_stale_temporaries,
    write_images_table,
)
from .pipeline import STAGES, SegmentSettings, Timer, forget_image, input_fingerprint, plate_columns
from .runtime import faults
from .verify import verify_records

log = logging.getLogger(__name__)
ENGINES = ("local", "ray", "dask")
# the tables' columns: 2 added the micrometre and model-choice columns, 3 touches_border and the
# per-channel means (an OUT of an earlier version would mix parts of two schemas in
# nuclei.parquet: refused, start it over)
TABLES_VERSION = 3


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


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"nucleibatch": __version__, "python": platform.python_version()}
    for package in ("torch", "segmentation-models-pytorch", "numpy", "zarr", "scikit-image", "tifffile", "pyarrow", "ray", "dask"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def run_segment_job(
    inputs: list[str],
    out: str | Path,
    model: str | NucleiModel = "auto",
    engine: str = "local",
    device: str = "auto",
    settings: SegmentSettings | None = None,
    batch_size: int = 4,
    precision: str = "auto",
    overwrite: bool = False,
    retry_failed: bool = False,
    verify: bool = False,
    address: str | None = None,
    workers: int = 0,
    gpus_per_worker: float = 1.0,
    progress: bool | None = None,
    post_workers: int | None = None,
    include: list[str] | tuple[str, ...] = (),
) -> RunSummary:
    """Segment every image of ``inputs`` into ``out`` (resuming what a previous run left).

    ``include``: ``--include`` globs; only the files they match are segmented
    (:func:`~nucleibatch.io.discover.included`). Not a recorded setting: like the INPUTs, a rerun
    with another filter adds the images it matches to OUT and keeps the ones done before.

    ``model``: ``"auto"`` (each image to the shipped bundle of its modality, :mod:`nucleibatch.choose`),
    a shipped bundle's name, a bundle folder, or a loaded model (every image to it).
    ``post_workers`` (local engine): processes that post-process while this process runs the
    model (None: :func:`~nucleibatch.engines.process_pool.default_post_workers`; 0: threads here).
    """
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if workers < 0 or gpus_per_worker <= 0:
        raise UsageError("--workers must be >= 0 (0: automatic) and --gpus-per-worker > 0")
    if post_workers is not None and post_workers < 0:
        raise UsageError(f"--post-workers must be >= 0 (0: post-process in the model's process), got {post_workers}")
    settings = settings or SegmentSettings()
    settings.validate()
    if not str(out).strip():
        raise UsageError("-o is empty; give the output folder, e.g. -o results (use -o . for the current folder)")
    inputs = [str(to_location(i)) for i in inputs]
    out_dir = to_location(out)
    started_at = time.time()
    started = time.perf_counter()
    if exists(out_dir) and not out_dir.is_dir():
        raise UsageError(f"-o {out_dir} is a file; give a folder")
    # cheap checks first: a mistyped argument fails before OUT is touched
    if engine != "local":
        require_extra(engine, f"--engine {engine}", "--engine local")
    # distributed engines: the driver's copy stays on the CPU; it is shipped to the model workers
    driver_device = device if engine == "local" else "cpu"
    if engine != "local" and device != "auto":
        resolve_device_name(device)
    elif engine == "local" and not isinstance(model, NucleiModel):
        resolve_device(driver_device)
    if not isinstance(model, NucleiModel) and model != "auto":
        bundle_folder(model)
    check_inputs_exist(inputs)
    make_dirs(out_dir)
    # then the lock: a second run on a live OUT is refused before it loads models or reads inputs
    with Lock(out_dir):
        post_pool = None
        try:
            if engine == "local":
                from .engines.process_pool import default_post_workers, start_post_pool

                if post_workers is None:
                    post_workers = default_post_workers(model.device.type if isinstance(model, NucleiModel) else resolve_device(driver_device).type, settings.instances_on)
                if post_workers:
                    post_pool = start_post_pool(post_workers)  # the processes start while the model loads
            cpus = usable_cpus()
            if engine == "local":
                limit_torch_threads(cpus.count)
            # the inputs are discovered (file headers probed) while the models load (torch and
            # smp imports, weights): the first block reaches the device that much sooner
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nb-discover") as discovery:
                discovered = discovery.submit(discover_inputs, inputs, channel=settings.channel, exclude=out_dir, include=tuple(include))
                models = load_models(model, device=driver_device, precision=precision)
                records = discovered.result()
            loaded = models.first  # the device, precision and post-processing processes are the same for every model
            if overwrite or overwrite_under_way(out_dir):
                if not overwrite:
                    log.warning("%s: an earlier run was stopped while --overwrite cleared it; finishing that first", out_dir)
                clear_outputs(out_dir)
            # local engine: "auto" recorded as what it means here (a GPU rerun must not mix methods);
            # distributed: each model worker resolves it for its own device, as the precision
            instances_on = resolve_instances_on(settings.instances_on, loaded.device.type) if engine == "local" else settings.instances_on
            # one model: as recorded before models were chosen per image (such OUTs resume alike)
            model_sha256 = {name: m.sha256 for name, m in models.models.items()} if models.routes else loaded.sha256
            # where images go in masks.zarr: OUT's own layout, chosen by its first run (output/layout.py)
            layout = layout_for_run(recorded_settings(out_dir), records, out_dir)
            records = assign_store_paths(records, layout)
            fingerprint = {"model_sha256": model_sha256, "settings": settings.to_dict() | {"instances_on": instances_on}, "tables": TABLES_VERSION, "layout": layout}
            # settings added since an OUT was started take the value that matches what the older
            # code did (instances were always made on the CPU), so an older run resumes only where alike
            check_settings(out_dir, fingerprint, {**SegmentSettings().to_dict(), "instances_on": "cpu"})
            remove_stale_temporaries(out_dir)
            open_root(OutputFolder(out_dir).masks)  # once, here: units running at once then only add groups
            finished = read_records(out_dir)
            reconcile_renamed(out_dir, records, finished)
            redo = images_to_redo(out_dir, records, finished, retry_failed, verify)
            todo = [r for r in records if r.image_id not in finished or r.image_id in redo]
            n_resumed = len(records) - len(todo)
            if n_resumed:
                log.info("resuming: %d of %d images are already done in %s", n_resumed, len(records), out_dir)
            if engine == "local":  # once the arguments and OUT are known good (a usage error stays one line)
                fallback = " (--device auto: no CUDA GPU here)" if device == "auto" and loaded.device.type == "cpu" else ""
                where = f"{post_workers} post-processing processes" if post_workers else "post-processing in this process"
                log.info("device %s%s, %s usable CPUs, %s", loaded.device, fallback, cpus, where)
            import pandas  # noqa: F401 - pyarrow imports it on its first NumPy conversion (~0.5 s): here, not inside the first image's table write

            timer = Timer()
            choose_started = time.perf_counter()
            todo = choose_all(todo, models, settings.channel, settings.invert, settings.pixel_size, settings.diameter)
            choose_seconds = time.perf_counter() - choose_started
            usage_before = {name: (m.usage.busy_seconds, m.usage.tiles, Counter(m.usage.batch_shapes)) for name, m in models.models.items()}
            if models.routes or settings.diameter == "auto":
                log.info("models and scales chosen for %d images in %.1f s: %s", len(todo), choose_seconds, dict(Counter(r.model for r in todo)))
            engine_started, engine_started_unix = time.perf_counter(), time.time()
            placement: list[dict[str, Any]] = []
            bar = Progress(len(records), n_resumed, progress)
            try:
                for name, group_model in models.models.items():
                    group = [r for r in todo if r.model == name]
                    if not group:
                        continue
                    if engine == "local":
                        from .engines.local import run_local

                        run_local(group, group_model, settings, out_dir, batch_size, timer, bar.update, placement, post_pool, post_workers, cpus.count)
                    else:
                        from importlib import import_module

                        run_engine = import_module(f".engines.{engine}_engine", __package__).run_engine
                        run_engine(group, group_model, device, settings, out_dir, batch_size, timer, bar.update, placement, address=address, workers=workers, gpus_per_worker=gpus_per_worker)
            finally:
                bar.close()
            engine_seconds = time.perf_counter() - engine_started
            busy = sum(m.usage.busy_seconds - usage_before[name][0] for name, m in models.models.items())
            tiles = sum(m.usage.tiles - usage_before[name][1] for name, m in models.models.items())
            shapes = sum((m.usage.batch_shapes - usage_before[name][2] for name, m in models.models.items()), Counter())
            faults.point("consolidate")
            rows = read_records(out_dir)
            for record in records:  # images recorded before plate columns existed: placed from this run's discovery
                row = rows.get(record.image_id)
                if row is not None and "plate" not in row:
                    row.update(plate_columns(record))
            write_images_table(out_dir, list(rows.values()))
            finished_names = {store_name(image_id) for image_id, row in rows.items() if row["status"] == "ok"}
            # every finished image's per-channel columns, in the order first met (by image_id)
            channel_columns = list(dict.fromkeys(c for _, row in sorted(rows.items()) if row["status"] == "ok" for c in row.get("channel_columns") or ()))
            finish_nuclei_dataset(out_dir, finished_names, channel_columns)
            drop_finished(out_dir, finished_names)
            write_layout(open_root(OutputFolder(out_dir).masks), OutputFolder(out_dir).masks, rows.values(), layout)
            current = [rows[r.image_id] for r in records if r.image_id in rows]
            wall = time.perf_counter() - started
            megapixels = sum((r.get("height") or 0) * (r.get("width") or 0) for r in current if r["status"] == "ok") / 1e6
            processed_mpix = bar.pixels / 1e6
            summary = RunSummary(
                out_dir=out_dir,
                n_images=len(current),
                n_ok=sum(r["status"] == "ok" for r in current),
                n_failed=sum(r["status"] != "ok" for r in current),
                n_nuclei=sum(int(r["n_nuclei"] or 0) for r in current),
                n_resumed=n_resumed,
                wall_seconds=round(wall, 3),
                megapixels=round(megapixels, 4),
            )
            summary.run = {
                "nucleibatch_version": __version__,
                "command": sys.argv,
                "inputs": [str(i) for i in inputs],
                "include": list(include),
                "layout": layout["kind"],  # of masks.zarr: plate, collection or flat (README, "Look at the results")
                "engine": engine,
                "device": str(loaded.device) if engine == "local" else device,
                # distributed: "auto" is resolved by each model worker for its own device
                "precision": ("bf16" if loaded.bf16 else "float32") if engine == "local" else loaded.precision,
                "instances_on": instances_on,
                "settings": settings.to_dict() | {"batch_size": batch_size},
                "post_workers": post_workers if engine == "local" else None,
                # one model: its post-processing (each model's is in "models")
                "postprocess": settings.postprocess or loaded.postprocess.to_dict(),
                "model": (
                    {"name": "auto", "sha256": "+".join(m.sha256[:12] for m in models.models.values()), "path": None}
                    if models.routes
                    else {"name": loaded.name, "sha256": loaded.sha256, "path": str(loaded.path)}
                ),
                "models": [entry | {"images": sum(r.get("model") == entry["name"] for r in current)} for entry in models.describe()],
                "choose_seconds": round(choose_seconds, 3),
                "pixel_size_um": settings.pixel_size,
                "diameter": settings.diameter,
                "scales": _scale_summary(current),
                "versions": _versions(),
                "units": "pixels (positions, lengths and areas in nuclei.parquet are in pixels of the full-resolution image; the *_um / *_um2 columns in micrometres where the pixel size is known)",
                "counts": {"images": summary.n_images, "ok": summary.n_ok, "failed": summary.n_failed, "nuclei": summary.n_nuclei, "resumed": n_resumed},
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
                "wall_seconds": summary.wall_seconds,
                "processed_megapixels": round(processed_mpix, 4),
                "mpix_per_s": round(processed_mpix / wall, 4) if wall > 0 else None,
                "stage_seconds": {stage: round(timer.seconds.get(stage, 0.0), 3) for stage in STAGES},
                # local engine: the one model's own count (distributed engines: the model workers' predict seconds are in stage_seconds)
                "model_busy_seconds": round(busy, 3) if engine == "local" else None,
                "engine_seconds": round(engine_seconds, 3),  # the images' processing, without model load, discovery and choosing models
                "engine_started_unix": round(engine_started_unix, 3),  # when that began (start-up is before it)
                "model_idle_fraction": round(max(0.0, 1 - busy / engine_seconds), 4) if engine == "local" and engine_seconds > 0 else None,
                "model_tiles": tiles if engine == "local" else None,
                "model_batches": [[*shape, count] for shape, count in sorted(shapes.items())] if engine == "local" else None,
                "device_peak_bytes": _device_peak_bytes(loaded.device) if engine == "local" else None,
                "stage_seconds_note": "summed over the threads/workers that ran each stage",
            }
            if engine != "local" or placement:
                summary.run["placement"] = placement_summary(placement)
                if placement:
                    append_placement(out_dir, placement)
            earlier = read_run(out_dir) if not todo else None
            if earlier is not None and earlier.get("counts") == summary.run["counts"] | {"resumed": earlier.get("counts", {}).get("resumed")}:
                summary.run = earlier  # nothing was done: the run that did the work keeps its figures
                summary.nothing_done = True
                if not exists(OutputFolder(out_dir).report):  # that run was stopped before it drew it
                    _write_report(out_dir)
                return summary
            write_bytes_atomic(OutputFolder(out_dir).run_json, (json.dumps(summary.run, indent=2) + "\n").encode())
            _write_report(out_dir)
            return summary
        finally:
            if post_pool is not None:
                post_pool.shutdown(wait=True, cancel_futures=True)


def _device_peak_bytes(device) -> int | None:
    """Most memory torch held on a CUDA device during the run (None on the CPU): what
    ``--batch-size`` and ``--block-size`` bound, whatever the images' sizes."""
    if device.type != "cuda":
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(device))


def _scale_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
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


def _write_report(out_dir: Location) -> None:
    """OUT/report.html; a report that cannot be drawn never fails the run (`nucleibatch report OUT` retries)."""
    from .report import write_report

    try:
        write_report(out_dir)
    except Exception as error:
        log.warning("report.html not written (%s: %s); rebuild it with: nucleibatch report %s", type(error).__name__, error, out_dir)


def reconcile_renamed(out_dir: Location, records: list[ImageRecord], finished: dict[str, dict[str, Any]]) -> None:
    """Images OUT holds under another id than this run gives them (never two rows for one file).

    * An INPUT added beside those that started OUT prefixes the ids that clash with its own
      (``a`` becomes ``r2/a``): redoing every image of the first INPUT under new ids is rarely
      wanted, so the run is refused, saying how to go on.
    * A file of the same name added beside one (``x.tif`` beside ``x.png``: both keep their
      extension in their ids): the few renamed images lose their old outputs and are redone
      under their new ids (``finished`` loses them too).

    Raises:
        UsageError: the first case, with an example and how to go on.
    """
    finished_as = {row.get("source"): image_id for image_id, row in finished.items()}
    renamed = [(finished_as[r.source], r.image_id) for r in records if r.source in finished_as and finished_as[r.source] != r.image_id]
    prefixed = [(old, new) for old, new in renamed if new.endswith("/" + old)]
    for old, new in renamed if not prefixed else []:
        log.info("%s: now has the id %r (a file of the same name beside it); its outputs as %r are replaced", finished[old].get("source"), new, old)
        forget_image(out_dir, old, finished[old].get("store_path"))
        finished.pop(old)
    if prefixed:
        old, new = prefixed[0]
        raise UsageError(
            f"{len(prefixed)} image(s) that OUT holds would get another id in this run (e.g. {old!r} is now {new!r}: ids come "
            "from the INPUTs, and an INPUT added beside those that started OUT prefixes the ids that clash); give the INPUTs "
            "of the run that started OUT (and the new ones their own -o OUT), or list every file in a CSV manifest with an "
            "image_id column, or pass --overwrite to start OUT over"
        )


def images_to_redo(
    out_dir: Location, records: list[ImageRecord], finished: dict[str, dict[str, Any]], retry_failed: bool, verify: bool
) -> set[str]:
    """The finished images a resumed run must do again: failed ones with ``retry_failed``, those
    whose input changed since (size/mtime or ETag), and with ``verify`` those whose outputs are damaged."""
    redo: set[str] = set()
    for record in records:
        row = finished.get(record.image_id)
        if row is None:
            continue
        if retry_failed and row["status"] != "ok":
            redo.add(record.image_id)
        # records from before fingerprints were kept lack "input"; None: the input was unreadable then
        elif "input" in row and row["input"] != input_fingerprint(record):
            log.info("%s changed since it was processed: redone", record.source)
            redo.add(record.image_id)
    if verify:
        report = verify_records(out_dir, {r.image_id: finished[r.image_id] for r in records if r.image_id in finished and r.image_id not in redo})
        for line in report.lines():
            log.info("verify: %s", line.strip())
        redo.update(damage.image_id for damage in report.damaged)
    return redo


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
