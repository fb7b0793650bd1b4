"""``nucleibatch verify OUT``: are the outputs of every finished image still whole?

Each image's completion record lists what the image wrote when it finished (every file of its
masks.zarr group with its size, and its nuclei part's size). Verifying compares that list with
what is there now: a deleted or truncated chunk, a lost metadata file or nuclei part marks the
image damaged. ``nucleibatch segment ... --verify`` verifies before resuming and redoes the
damaged images. Sizes, not checksums: a bit flipped in place is not detected (reading every
chunk back would cost as much as writing it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .io.location import Location, file_size, file_sizes
from .io.tables import check_segment_output, read_records


@dataclass
class Damage:
    """What is wrong with one finished image's outputs."""

    image_id: str
    store_path: str
    problems: list[str]


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_output`."""

    out_dir: Location
    checked: int = 0
    damaged: list[Damage] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)  # records written before manifests existed

    @property
    def intact(self) -> bool:
        return not self.damaged

    def lines(self) -> list[str]:
        """Human-readable summary, one line per damaged image (at most 20 shown)."""
        lines = [f"verified {self.checked} finished images in {self.out_dir}: {len(self.damaged)} damaged"]
        for damage in self.damaged[:20]:
            lines.append(f"  {damage.image_id}: {'; '.join(damage.problems[:3])}{' ...' if len(damage.problems) > 3 else ''}")
        if len(self.damaged) > 20:
            lines.append(f"  ... and {len(self.damaged) - 20} more")
        if self.unverifiable:
            lines.append(f"  {len(self.unverifiable)} image(s) have no output list (written by an older version): not checked")
        if self.damaged:
            lines.append("  re-run the same `nucleibatch segment ... -o OUT` command with --verify to redo them")
        return lines


def image_damage(out_dir: Location, row: dict[str, Any]) -> list[str]:
    """Problems of one finished ('ok') image's outputs against its record's manifest; [] when whole."""
    manifest = row["outputs"]
    name = row["store_path"]
    problems = []
    found = file_sizes(out_dir / "masks.zarr" / name)
    for key, size in sorted(manifest.get("masks", {}).items()):
        now = found.get(key)
        if now is None:
            problems.append(f"masks.zarr/{name}/{key} is missing")
        elif now != size:
            problems.append(f"masks.zarr/{name}/{key} has {now} bytes, {size} when written")
    part = f"nuclei.parquet/{name}.parquet"
    now = file_size(out_dir / "nuclei.parquet" / f"{name}.parquet")
    if now is None:
        problems.append(f"{part} is missing")
    elif manifest.get("nuclei_part") is not None and now != manifest["nuclei_part"]:
        problems.append(f"{part} has {now} bytes, {manifest['nuclei_part']} when written")
    return problems


def verify_records(out_dir: Location, records: dict[str, dict[str, Any]]) -> VerifyReport:
    """Verify the finished images among ``records`` (see :func:`image_damage`)."""
    report = VerifyReport(out_dir)
    for image_id, row in sorted(records.items()):
        if row.get("status") != "ok":
            continue
        if not isinstance(row.get("outputs"), dict):
            report.unverifiable.append(image_id)
            continue
        report.checked += 1
        problems = image_damage(out_dir, row)
        if problems:
            report.damaged.append(Damage(image_id, row["store_path"], problems))
    return report


def verify_output(out: str | Location) -> VerifyReport:
    """Verify every finished image of a segment output.

    Raises:
        NotSegmentOutputError: ``out`` is not a segment output.
    """
    out_dir = check_segment_output(out)
    return verify_records(out_dir, read_records(out_dir))
