"""The `segment` job: discovery, resume, engine, tables, run.json and the closing summary."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import UsageError
from ..io.discover import ImageRecord, check_inputs_exist, discover_inputs
from ..io.location import Location, exists, make_dirs, to_location
from ..io.readers import forget_decoded_images
from ..output.atomic import write_bytes_atomic
from ..output.checkpoints import drop_finished
from ..output.folder import OutputFolder, not_inputs
from ..output.layout import assign_store_paths, layout_for_run, write_layout
from ..output.lock import Lock
from ..output.reader import read_run
from ..output.state import (
    append_placement,
    check_settings,
    clear_outputs,
    overwrite_under_way,
    recorded_settings,
)
from ..output.store import open_root, store_name
from ..output.tables import (
    finish_nuclei_dataset,
    read_records,
    remove_stale_temporaries,
    write_images_table,
)
from ..runtime import faults
from .engines import EngineRun, engine_for
from .resume import images_to_redo, reconcile_renamed
from .rows import plate_columns
from .settings import TABLES_VERSION, JobOptions, SegmentSettings, settings_of_older_runs
from .summary import Progress, RunSummary, package_versions, placement_summary, scale_summary
from .timer import STAGES, Timer

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


def run_segment_job(
    inputs: list[str], out: str | Path, settings: SegmentSettings | None = None, options: JobOptions | None = None, **option_values: Any
) -> RunSummary:
    """Segment every image of ``inputs`` into ``out`` (resuming what a previous run left).

    ``settings``: what changes the results (recorded in OUT, checked on resume). ``options``: how
    the job runs; or its fields as keywords (``model="default", device="cpu"``), the rest
    defaults (:class:`JobOptions`).

    Raises:
        UsageError: a bad argument, a live or incompatible OUT (nothing is touched then).
    """
    if options is not None and option_values:
        raise TypeError("give the job's options either as options=JobOptions(...) or as keywords, not both")
    options = options or JobOptions(**{**option_values, "include": tuple(option_values.get("include", ()))})
    options.validate()
    settings = settings or SegmentSettings()
    settings.validate()
    if not str(out).strip():
        raise UsageError("-o is empty; give the output folder, e.g. -o results (use -o . for the current folder)")
    inputs = [str(to_location(i)) for i in inputs]
    out_dir = to_location(out)
    started_at, started = time.time(), time.perf_counter()
    if exists(out_dir) and not out_dir.is_dir():
        raise UsageError(f"-o {out_dir} is a file; give a folder")
    # cheap checks first: a mistyped argument fails before OUT is touched
    engine = engine_for(options, settings)
    engine.check()
    if isinstance(options.model, str) and options.model != "auto":
        from ..model.bundle import bundle_folder

        bundle_folder(options.model)
    check_inputs_exist(inputs)
    make_dirs(out_dir)
    # then the lock: a second run on a live OUT is refused before it loads models or reads inputs
    with Lock(out_dir), engine:
        from .choose import choose_all, load_models

        # the inputs are discovered (file headers probed) while the models load (torch and
        # smp imports, weights): the first block reaches the device that much sooner
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nb-discover") as discovery:
            discovered = discovery.submit(discover_inputs, inputs, channel=settings.channel, not_inputs=not_inputs(out_dir), include=options.include)
            models = load_models(options.model, device=engine.model_device, precision=options.precision)
            records = discovered.result()
        loaded = models.first  # the device, precision and post-processing processes are the same for every model
        if options.overwrite or overwrite_under_way(out_dir):
            if not options.overwrite:
                log.warning("%s: an earlier run was stopped while --overwrite cleared it; finishing that first", out_dir)
            clear_outputs(out_dir)
        instances_on = engine.instances_on(settings.instances_on, loaded)
        # one model: as recorded before models were chosen per image (such OUTs resume alike)
        model_sha256 = {name: m.sha256 for name, m in models.models.items()} if models.routes else loaded.sha256
        # where images go in masks.zarr: OUT's own layout, chosen by its first run (output/layout.py)
        layout = layout_for_run(recorded_settings(out_dir), records, out_dir)
        records = assign_store_paths(records, layout)
        fingerprint = {"model_sha256": model_sha256, "settings": settings.to_dict() | {"instances_on": instances_on}, "tables": TABLES_VERSION, "layout": layout}
        check_settings(out_dir, fingerprint, settings_of_older_runs())
        remove_stale_temporaries(out_dir)
        open_root(OutputFolder(out_dir).masks)  # once, here: units running at once then only add groups
        finished = read_records(out_dir)
        reconcile_renamed(out_dir, records, finished)
        redo = images_to_redo(out_dir, records, finished, options.retry_failed, options.verify)
        todo = [r for r in records if r.image_id not in finished or r.image_id in redo]
        n_resumed = len(records) - len(todo)
        if n_resumed:
            log.info("resuming: %d of %d images are already done in %s", n_resumed, len(records), out_dir)
        engine.loaded(loaded)
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
        bar = Progress(len(records), n_resumed, options.progress)
        try:
            for name, group_model in models.models.items():
                group = [r for r in todo if r.model == name]
                if group:
                    engine.run(EngineRun(group, group_model, settings, out_dir, options.batch_size, timer, bar.update, placement))
        finally:
            bar.close()
            forget_decoded_images()
        engine_seconds = time.perf_counter() - engine_started
        busy = sum(m.usage.busy_seconds - usage_before[name][0] for name, m in models.models.items())
        tiles = sum(m.usage.tiles - usage_before[name][1] for name, m in models.models.items())
        shapes = sum((m.usage.batch_shapes - usage_before[name][2] for name, m in models.models.items()), Counter())
        rows = consolidate(out_dir, records, layout)
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
            "include": list(options.include),
            "layout": layout["kind"],  # of masks.zarr: plate, collection or flat (README, "Look at the results")
            "engine": options.engine,
            "instances_on": instances_on,
            "settings": settings.to_dict() | {"batch_size": options.batch_size},
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
            "scales": scale_summary(current),
            "versions": package_versions(),
            "units": "pixels (positions, lengths and areas in nuclei.parquet are in pixels of the full-resolution image; the *_um / *_um2 columns in micrometres where the pixel size is known)",
            "counts": {"images": summary.n_images, "ok": summary.n_ok, "failed": summary.n_failed, "nuclei": summary.n_nuclei, "resumed": n_resumed},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
            "wall_seconds": summary.wall_seconds,
            "processed_megapixels": round(processed_mpix, 4),
            "mpix_per_s": round(processed_mpix / wall, 4) if wall > 0 else None,
            "stage_seconds": {stage: round(timer.seconds.get(stage, 0.0), 3) for stage in STAGES},
            "engine_seconds": round(engine_seconds, 3),  # the images' processing, without model load, discovery and choosing models
            "engine_started_unix": round(engine_started_unix, 3),  # when that began (start-up is before it)
            # where the network ran; the local engine's own model copy: how busy it was (distributed
            # engines: the model workers' predict seconds are in stage_seconds)
            **engine.run_figures(loaded, busy, tiles, shapes, engine_seconds),
            "stage_seconds_note": "summed over the threads/workers that ran each stage",
        }
        if options.engine != "local" or placement:
            summary.run["placement"] = placement_summary(placement)
            if placement:
                append_placement(out_dir, placement)
        earlier = read_run(out_dir) if not todo else None
        if earlier is not None and earlier.get("counts") == summary.run["counts"] | {"resumed": earlier.get("counts", {}).get("resumed")}:
            summary.run = earlier  # nothing was done: the run that did the work keeps its figures
            summary.nothing_done = True
            if not exists(OutputFolder(out_dir).report):  # that run was stopped before it drew it
                write_report_or_warn(out_dir)
            return summary
        write_bytes_atomic(OutputFolder(out_dir).run_json, (json.dumps(summary.run, indent=2) + "\n").encode())
        write_report_or_warn(out_dir)
        return summary


def consolidate(out_dir: Location, records: list[ImageRecord], layout: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """After the engine: images.parquet from the completion records, the nuclei dataset of the
    finished images, their checkpoints dropped, masks.zarr's layout metadata. Returns the rows by image id."""
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
    return rows


def write_report_or_warn(out_dir: Location) -> None:
    """OUT/report.html; a report that cannot be drawn never fails the run (`nucleibatch report OUT` retries)."""
    from ..report import write_report

    try:
        write_report(out_dir)
    except Exception as error:
        log.warning("%s not written (%s: %s); rebuild it with: nucleibatch report %s", OutputFolder(out_dir).report, type(error).__name__, error, out_dir)
