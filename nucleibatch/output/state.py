"""What a run keeps in ``OUT/.nucleibatch`` to resume, refuse or start over (call while holding
OUT's :class:`~nucleibatch.output.lock.Lock`).

* ``settings.json``: the model and settings of the run that started OUT; a later run resumes
  only with the same ones (:func:`check_settings`).
* ``overwriting``: ``--overwrite`` is clearing OUT; a run killed meanwhile leaves it, and the
  next run (with ``--overwrite`` or not) finishes the clearing instead of resuming half an OUT
  (:func:`clear_outputs`, :func:`overwrite_under_way`).
* ``placement.jsonl``: the block units of distributed runs, one JSON line each.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import UsageError
from ..io.location import Location, fresh_listing, is_remote, read_many, remove
from ..runtime import faults
from .atomic import write_bytes_atomic
from .folder import LOCK, OUTPUT_NAMES, OVERWRITE_MARKER, STATE_DIR, OutputFolder
from .layout import FLAT

# settings of earlier versions that no longer exist (--context: the network reads the model's halo)
RETIRED_SETTINGS = ("settings.context",)


def clear_outputs(out_dir: Location) -> None:
    """Remove what a previous run wrote to OUT (only our own names; other files are kept).

    Resumable: :data:`~nucleibatch.output.folder.OVERWRITE_MARKER` says a clearing is under way
    until it is complete."""
    folder = OutputFolder(out_dir)
    marker = folder.overwrite_marker
    write_bytes_atomic(marker, b"--overwrite under way: the next run of any segment command on this OUT finishes it\n")
    for name in OUTPUT_NAMES:
        if name == STATE_DIR:
            for child in fresh_listing(folder.state):  # keep the lock of the run that clears, and the marker
                if child.name not in (LOCK, OVERWRITE_MARKER):
                    remove(child)
        else:
            remove(folder.root / name)
        faults.point(f"clear:{name}")
    remove(marker)


def overwrite_under_way(out_dir: Location) -> bool:
    """Whether a run was killed while ``--overwrite`` cleared OUT (see :func:`clear_outputs`)."""
    marker = OutputFolder(out_dir).overwrite_marker
    return bool(fresh_listing(marker.parent, marker.name))


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recorded_settings(out_dir: Location) -> dict[str, Any] | None:
    """What the first run on OUT recorded in ``.nucleibatch/settings.json`` (None: a new OUT)."""
    path = OutputFolder(out_dir).settings
    recorded = read_many(fresh_listing(path.parent, path.name)).get(str(path))
    return json.loads(recorded) if recorded is not None else None


def check_settings(out_dir: Location, fingerprint: dict[str, Any], settings_before_added: dict[str, Any]) -> None:
    """Refuse an OUT written with another model or other settings; record them on first use.

    Args:
        fingerprint: this run's ``{"model_sha256", "settings", "tables", "layout"}``.
        settings_before_added: the value of each setting that matches what older code did, for
            OUTs recorded before the setting existed (an older run resumes only where alike).

    Raises:
        UsageError: OUT's recorded fingerprint differs (the message lists the differences and
            how to go on).
    """
    path = OutputFolder(out_dir).settings
    recorded = recorded_settings(out_dir)
    if recorded is not None:
        # an OUT recorded before layouts existed had every image in a flat group
        previous = _flatten({"settings": settings_before_added, "layout": FLAT}) | _flatten(recorded)
        for key in RETIRED_SETTINGS:  # settings that no longer change results: OUTs made with them resume
            previous.pop(key, None)
        now = _flatten(fingerprint)
        changed = [f"{k.removeprefix('settings.')}: {previous.get(k)} -> {now.get(k)}" for k in sorted(set(previous) | set(now)) if previous.get(k) != now.get(k)]
        if changed:
            hint = ""
            if any(key.startswith("model_sha256") for key in changed):
                hint = " (an OUT segmented with one model resumes with that --model, e.g. --model default; one made with --model auto, without --model)"
            if any(key.startswith("tables") for key in changed):
                hint += " (made by an older nucleibatch, whose tables lack newer columns: micrometres, model, touches_border, per-channel intensities)"
            raise UsageError(
                f"{out_dir} holds results of another model or settings (differs in: {', '.join(changed)}){hint}; "
                "re-run with the same settings to resume, pass --overwrite to start over, or give a new -o OUT"
            )
    else:
        write_bytes_atomic(path, (json.dumps(fingerprint, indent=2, sort_keys=True) + "\n").encode())


def append_placement(out_dir: Location, placement: list[dict[str, Any]]) -> None:
    """Add the block units of this run to ``OUT/.nucleibatch/placement.jsonl``."""
    lines = "".join(json.dumps(unit, sort_keys=True) + "\n" for unit in placement)
    path = OutputFolder(out_dir).placement
    if is_remote(path):  # objects cannot be appended to: rewrite it whole
        before = read_many(fresh_listing(path.parent, path.name)).get(str(path)) or b""
        write_bytes_atomic(path, before + lines.encode())
        return
    with open(path, "a") as handle:
        handle.write(lines)
