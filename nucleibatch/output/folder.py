"""The names and layout of OUT, the folder that ``nucleibatch segment -o OUT`` writes.

The one place that spells them (README, "Look at the results", and docs/DESIGN section 3 are
the contract)::

    OUT/
        masks.zarr/              OME-Zarr: one group per image (store_path), labels at labels/nuclei
        nuclei.parquet/          one parquet part per image (<store name>.parquet)
        images.parquet           one row per image
        run.json                 settings, model, counts, figures of the last run
        report.html              the QC report
        export/<format>/         `nucleibatch export`'s default destination
        .nucleibatch/            the run's own state (not an output)
            lock                 one live run per OUT (a flock, or an object-store lease)
            settings.json        model and settings of the first run (resume refuses others)
            overwriting          --overwrite is clearing OUT (a killed clearing is finished first)
            placement.jsonl      block units per worker (distributed engines)
            records/<name>.json  an image's completion record: it is finished when this exists
            blocks/<name>/       block checkpoints of an image being segmented

:class:`OutputFolder` answers these paths for one OUT (a local path or an object-store URL);
the module constants name what code outside ``output/`` needs to recognise an OUT.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..io.discover import NotInputs
from ..io.location import Location, to_location

MASKS = "masks.zarr"
NUCLEI = "nuclei.parquet"
IMAGES = "images.parquet"
RUN = "run.json"
REPORT = "report.html"
EXPORT = "export"
STATE_DIR = ".nucleibatch"
# inside .nucleibatch/
LOCK = "lock"
SETTINGS = "settings.json"
OVERWRITE_MARKER = "overwriting"
PLACEMENT = "placement.jsonl"
RECORDS = "records"
BLOCKS = "blocks"
# inside an image's group of masks.zarr: the label image (NGFF labels group, one label named nuclei)
LABELS_GROUP = "labels"
LABEL_NAME = "nuclei"
LABELS = f"{LABELS_GROUP}/{LABEL_NAME}"

# what --overwrite clears: every name segment writes (other files in OUT are kept)
OUTPUT_NAMES = (MASKS, NUCLEI, IMAGES, RUN, REPORT, STATE_DIR)
# folders of OUT that input discovery never searches for images
OUTPUT_FOLDERS = frozenset({MASKS, NUCLEI, EXPORT})


def not_inputs(own: Location | None = None) -> NotInputs:
    """What input discovery leaves out (:class:`~nucleibatch.io.discover.NotInputs`): the output
    folders of any OUT (recognised by its state folder) and of ``own``, the run's own OUT."""
    return NotInputs(STATE_DIR, OUTPUT_FOLDERS, own)


def label_path(level: int | str = 0, store_path: str | None = None) -> str:
    """The zarr path of the label image's pyramid level ``level`` inside an image group
    (``labels/nuclei/0``), or from masks.zarr's root when ``store_path`` (the image's group) is given."""
    inside = f"{LABELS}/{level}"
    return f"{store_path}/{inside}" if store_path else inside


@dataclass(frozen=True)
class OutputFolder:
    """The paths of one OUT. ``root``: a local path, ``file://`` URL or fsspec URL (``s3://...``).

    Every attribute is a :data:`~nucleibatch.io.location.Location` (``pathlib.Path`` or
    ``upath.UPath``); nothing is created or read.
    """

    root: Location

    def __init__(self, root: str | Location) -> None:
        object.__setattr__(self, "root", to_location(root))

    @property
    def masks(self) -> Location:
        """``OUT/masks.zarr``: the OME-Zarr store of labels (and images)."""
        return self.root / MASKS

    @property
    def nuclei(self) -> Location:
        """``OUT/nuclei.parquet``: the folder of per-image parts (``pandas.read_parquet`` reads it whole)."""
        return self.root / NUCLEI

    @property
    def images(self) -> Location:
        """``OUT/images.parquet``: one row per image."""
        return self.root / IMAGES

    @property
    def run_json(self) -> Location:
        """``OUT/run.json``: the last run's settings and figures."""
        return self.root / RUN

    @property
    def report(self) -> Location:
        """``OUT/report.html``."""
        return self.root / REPORT

    @property
    def exports(self) -> Location:
        """``OUT/export``: the folder of ``nucleibatch export``'s default destinations, one per format."""
        return self.root / EXPORT

    def export(self, fmt: str) -> Location:
        """``OUT/export/<fmt>``: where ``nucleibatch export --format fmt`` writes by default."""
        return self.root / EXPORT / fmt

    @property
    def state(self) -> Location:
        """``OUT/.nucleibatch``: the run's own state (lock, settings, records, checkpoints)."""
        return self.root / STATE_DIR

    @property
    def lock(self) -> Location:
        return self.state / LOCK

    @property
    def settings(self) -> Location:
        return self.state / SETTINGS

    @property
    def overwrite_marker(self) -> Location:
        return self.state / OVERWRITE_MARKER

    @property
    def placement(self) -> Location:
        return self.state / PLACEMENT

    @property
    def records(self) -> Location:
        """The folder of completion records."""
        return self.state / RECORDS

    @property
    def blocks(self) -> Location:
        """The folder of block checkpoints (one subfolder per image being segmented)."""
        return self.state / BLOCKS

    def record(self, name: str) -> Location:
        """The completion record of the image whose store name is ``name``."""
        return self.records / f"{name}.json"

    def checkpoints(self, name: str) -> Location:
        """The block checkpoint folder of the image whose store name is ``name``."""
        return self.blocks / name

    def nuclei_part(self, name: str) -> Location:
        """The nuclei part of the image whose store name is ``name`` (flat, also for a plate field)."""
        return self.nuclei / f"{name}.parquet"

    def image_group(self, store_path: str) -> Location:
        """The folder of an image's group inside masks.zarr."""
        return self.masks / store_path
