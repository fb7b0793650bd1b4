"""``nucleibatch verify OUT``: are the outputs of every finished image still whole?

Each image's completion record lists what the image wrote when it finished (every file of its
masks.zarr group with its size, and its nuclei part's size). Verifying compares that list with
what is there now: a deleted or truncated chunk, a lost metadata file or nuclei part marks the
image damaged, and so does a nuclei part left beside a failed image. The tables are checked
too: ``images.parquet`` must hold exactly the finished images' rows, and every nuclei part must
belong to a finished image. ``nucleibatch segment ... --verify`` verifies before resuming, redoes
the damaged images and rebuilds the tables. Sizes, not checksums: a bit flipped in place is not detected (reading every
chunk back would cost as much as writing it).
"""

from __future__ import annotations

import numbers
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .io.location import Location, exists, file_size, file_sizes, fresh_listing
from .output.folder import IMAGES, MASKS, NUCLEI, OutputFolder
from .output.reader import read_images
from .output.store import store_name
from .output.tables import IMAGE_COLUMNS, TABLE_HELPERS, check_segment_output, read_records

# images.parquet columns whose values must equal the completion records'
TABLE_CHECKED = ("status", "n_nuclei", "height", "width", "store_path")


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
    table_problems: list[str] = field(default_factory=list)  # images.parquet and nuclei parts against the records

    @property
    def intact(self) -> bool:
        return not self.damaged and not self.table_problems

    def lines(self) -> list[str]:
        """Human-readable summary, one line per damaged image (at most 20 shown)."""
        lines = [f"verified {self.checked} finished images in {self.out_dir}: {len(self.damaged)} damaged"]
        lines += [f"  tables: {problem}" for problem in self.table_problems[:20]]
        if len(self.table_problems) > 20:
            lines.append(f"  tables: ... and {len(self.table_problems) - 20} more")
        for damage in self.damaged[:20]:
            lines.append(f"  {damage.image_id}: {'; '.join(damage.problems[:3])}{' ...' if len(damage.problems) > 3 else ''}")
        if len(self.damaged) > 20:
            lines.append(f"  ... and {len(self.damaged) - 20} more")
        if self.unverifiable:
            lines.append(f"  {len(self.unverifiable)} image(s) have no output list (written by an older version): not checked")
        if self.damaged or self.table_problems:
            lines.append("  re-run the same `nucleibatch segment ... -o OUT` command with --verify to redo them and rebuild the tables")
        return lines


def image_damage(out_dir: Location, row: dict[str, Any]) -> list[str]:
    """Problems of one finished ('ok') image's outputs against its record's manifest; [] when whole."""
    manifest = row["outputs"]
    group = row["store_path"]
    name = store_name(row["image_id"])  # the nuclei part's (a plate field's group is nested, its part flat)
    problems = []
    folder = OutputFolder(out_dir)
    found = file_sizes(folder.image_group(group))
    for key, size in sorted(manifest.get("masks", {}).items()):
        now = found.get(key)
        if now is None:
            problems.append(f"{MASKS}/{group}/{key} is missing")
        elif now != size:
            problems.append(f"{MASKS}/{group}/{key} has {now} bytes, {size} when written")
    part = f"{NUCLEI}/{name}.parquet"
    now = file_size(folder.nuclei_part(name))
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
            part = OutputFolder(out_dir).nuclei_part(store_name(image_id))
            if file_size(part) is not None:
                report.damaged.append(Damage(image_id, store_name(image_id), [f"{NUCLEI}/{part.name} is left from before the image failed"]))
            continue
        if not isinstance(row.get("outputs"), dict):
            report.unverifiable.append(image_id)
            continue
        report.checked += 1
        problems = image_damage(out_dir, row)
        if problems:
            report.damaged.append(Damage(image_id, row["store_path"], problems))
    return report


def table_problems(out_dir: Location, records: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with ``images.parquet`` and the nuclei parts against the completion records
    ``records`` (by image_id): rows missing, extra, duplicated or disagreeing; parts of no
    finished image. [] when they agree (or when no table was written yet: a run in progress)."""
    problems = []
    folder = OutputFolder(out_dir)
    if exists(folder.images):
        try:
            rows = read_images(out_dir)
            rows = rows[[c for c in IMAGE_COLUMNS if c in rows.columns]]  # tables of older versions lack the later columns (plate, well, field)
        except Exception as error:
            return [f"{IMAGES} is unreadable ({type(error).__name__}: {error})"]
        ids = rows["image_id"].tolist()
        twice = sorted(i for i, count in Counter(ids).items() if count > 1)
        if twice:
            problems.append(f"{IMAGES} has {len(twice)} image(s) on more than one row, e.g. {twice[0]!r}")
        missing = sorted(set(records) - set(ids))
        if missing:
            problems.append(f"{IMAGES} lacks {len(missing)} finished image(s), e.g. {missing[0]!r}")
        extra = sorted(set(ids) - set(records))
        if extra:
            problems.append(f"{IMAGES} has {len(extra)} row(s) of no finished image, e.g. {extra[0]!r}")
        for row in rows.drop_duplicates("image_id").to_dict("records"):
            record = records.get(row["image_id"])
            differing = [key for key in TABLE_CHECKED if record is not None and _value(row.get(key)) != _value(record.get(key))]
            if differing:
                problems.append(f"{IMAGES} row of {row['image_id']!r} differs from its completion record in {', '.join(differing)}")
    names = {store_name(image_id) for image_id in records}  # a failed image's part: damage of that image
    orphans = sorted(p.name for p in fresh_listing(folder.nuclei, "*.parquet") if p.name not in TABLE_HELPERS and p.name.removesuffix(".parquet") not in names)
    if orphans:
        problems.append(f"{NUCLEI} has {len(orphans)} part(s) of no finished image: {', '.join(orphans[:3])}{' ...' if len(orphans) > 3 else ''}")
    return problems


def _value(value: Any) -> Any:
    """A table cell or record value, comparable (NaN/None alike, numbers as numbers)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return float(value)
    return value


def verify_output(out: str | Location) -> VerifyReport:
    """Verify every finished image of a segment output, and its tables.

    Raises:
        NotSegmentOutputError: ``out`` is not a segment output.
    """
    out_dir = check_segment_output(out)
    records = read_records(out_dir)
    report = verify_records(out_dir, records)
    report.table_problems = table_problems(out_dir, records)
    return report
