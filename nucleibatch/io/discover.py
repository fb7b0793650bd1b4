"""Discovery: turn the INPUT arguments of ``nucleibatch segment`` into one record per image.

An INPUT is a folder (searched recursively), an image file, a zarr store, or a manifest
(``.txt``: one path per line, ``#`` comments; ``.csv``/``.tsv``: a ``path`` column and an
optional ``image_id`` column; relative paths are relative to the manifest's folder).
Only headers and metadata are read here; pixels are read later through
:func:`nucleibatch.io.readers.open_source`. The rules (which files, which ids, how
pages/series/axes become images) are written up in docs/inputs.md.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatchcase
from functools import cached_property
from pathlib import Path, PurePosixPath

from ..channels import find_channel, resolve_channel
from ..errors import ImageReadError, UsageError
from .location import Location, exists, fingerprint, is_remote, to_location
from .readers import PIL_SUFFIXES, ProbedImage, printable, probe

log = logging.getLogger(__name__)

PLAIN_SUFFIXES = frozenset(PIL_SUFFIXES)  # .png .jpg .jpeg .bmp .gif
TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".btf", ".tf8", ".tf2", ".svs", ".ndpi"})
ZARR_SUFFIXES = frozenset({".zarr"})
MANIFEST_SUFFIXES = frozenset({".txt", ".csv", ".tsv"})
# double extensions removed whole from ids: x.ome.tif -> x
DOUBLE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.btf", ".ome.zarr")
# in a folder that has images/, these siblings hold annotations (DSB masks, label images)
ANNOTATION_FOLDERS = frozenset({"masks", "labels"})
ZARR_METADATA = ("zarr.json", ".zgroup", ".zarray")


@dataclass(frozen=True)
class NotInputs:
    """The folders discovery does not search: in an OUT of `nucleibatch segment` (a folder that
    holds ``marker``, its state folder, or ``own``, the run's own OUT), its output folders
    ``folders`` (labels, nuclei parts, `nucleibatch export`'s default). The rest of such a folder
    is searched: a user may keep the images in the OUT folder itself. The names are OUT's
    (:func:`nucleibatch.output.folder.not_inputs`), given by the caller."""

    marker: str
    folders: frozenset[str]
    own: Location | None = None

    @cached_property
    def own_key(self) -> str | None:
        return None if self.own is None else _key(self.own)


@dataclass(frozen=True)
class ImageRecord:
    """One image to segment (cheap to pickle: send these to workers, not open sources).

    Attributes:
        image_id: unique, stable across runs; the path relative to the input root, posix
            separators, extension removed (rules in docs/inputs.md).
        source: human-readable origin: the file path, plus ``/node`` inside a zarr store
            and ``#series=1,t=3``-style position for one image of a multi-image file.
        path: the file or zarr store.
        kind: ``"plain"`` (PNG/JPEG/BMP/GIF via PIL), ``"tiff"`` or ``"zarr"``.
        shape: ``(H, W)``; None when ``error`` is set.
        channels: ``C >= 1``; None when ``error`` is set.
        dtype: numpy dtype name (``"uint8"``, ``"uint16"``, ``"float32"``...); None when
            ``error`` is set.
        selector: what :func:`~nucleibatch.io.readers.open_source` needs to find the
            image inside the file (JSON-serialisable): tiff ``{"series", "axes", "index"}``,
            zarr ``{"node", "levels", "axes", "index"}``, plain ``{}``.
        error: set when the file was found but cannot be used; one line. The pipeline
            writes such a record as a 'failed' row with this reason.
        pixel_size_um: micrometres per pixel, from the file's metadata or ``--pixel-size``;
            None when unknown.
        fingerprint: the input file's or store's :func:`~nucleibatch.io.location.fingerprint`
            when it was discovered (before its header was read; None: it could not be read). A
            run records it with the image, and the next run redoes the image when the input's
            fingerprint differs: a file changed, repaired or created since, even while this run
            was reading it.
        modality, model, scale: how ``segment`` treats the image, decided before it runs
            (:mod:`nucleibatch.segment.choose`): its modality (:mod:`nucleibatch.modality`), the name of
            the model bundle it goes to (None: the run's one model), and the factor it is
            resampled by for that model (:mod:`nucleibatch.scale`; 1: not resampled).
        plate, well, field: for a field of an OME-Zarr plate (NGFF plate metadata), the plate's
            id (the image id's part that names the plate: ``plateA`` for ``plateA/B/2/0``), the
            well's path in the plate (``B/2``: row and column names) and the field's path in
            the well (``0``); None for any other image.
        store_path: the image's group in OUT/masks.zarr when it is not the flat
            :func:`~nucleibatch.output.store.store_name` of its id (plate fields: ``B/2/0``, set by
            ``segment`` from the output's layout, :mod:`nucleibatch.output.layout`).
        channel_names: one name per channel (``""`` where a channel has none) from the file's
            metadata (OME-XML ``Channel Name``, OME-Zarr ``omero.channels[].label``); None when
            the file names no channel. ``--channel NAME`` and the per-channel columns use them
            (:mod:`nucleibatch.channels`).
    """

    image_id: str
    source: str
    path: str
    kind: str
    shape: tuple[int, int] | None
    channels: int | None
    dtype: str | None
    selector: dict = field(default_factory=dict, hash=False)
    error: str | None = None
    pixel_size_um: float | None = None
    fingerprint: str | None = None
    modality: str | None = None
    model: str | None = None
    scale: float = 1.0
    channel_names: tuple[str, ...] | None = None
    plate: str | None = None
    well: str | None = None
    field: str | None = None  # (shadows dataclasses.field below this line: use it above only)
    store_path: str | None = None

    def to_dict(self) -> dict:
        """JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        data = asdict(self)
        data["shape"] = list(self.shape) if self.shape is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ImageRecord:
        data = dict(data)
        if data.get("shape") is not None:
            data["shape"] = tuple(int(v) for v in data["shape"])
        if data.get("channel_names") is not None:
            data["channel_names"] = tuple(str(v) for v in data["channel_names"])
        return cls(**data)


@dataclass
class _Candidate:
    """A file or zarr store found under one input, before probing."""

    root: int  # index of the INPUT it came from
    path: Location
    kind: str
    rel: str  # path from the input root, with extension (the collision fallback)
    base: str  # preferred id: rel without extension (DSB: the sample folder)
    fixed_id: str | None = None  # manifest image_id column
    error: str | None = None
    image_id: str = ""


def discover_inputs(
    inputs: Sequence[str], channel: int | str | None = None, not_inputs: NotInputs | None = None, include: Sequence[str] = ()
) -> list[ImageRecord]:
    """Find every image under the INPUT paths.

    Args:
        inputs: folders, image files, zarr stores, manifests (.txt / .csv / .tsv).
        channel: the ``--channel`` asked for: an index (images with fewer channels get an
            ``error``) or a channel name (images without a channel of that name get an
            ``error`` listing theirs; a :class:`UsageError` when no input has it).
        not_inputs: the output folders of OUTs, not searched (:class:`NotInputs`); None: every
            folder is searched. Unlistable folders are skipped with a warning.
        include: ``--include`` glob patterns: only the files and zarr stores that one of them
            matches are kept (:func:`included`); empty: all.

    Returns:
        One :class:`ImageRecord` per image, sorted by ``image_id``. Files that are found
        but cannot be used (empty, truncated header, unsupported type, too small, axes
        that cannot be understood...) are records with ``error`` set.

    Raises:
        UsageError: an INPUT does not exist or is not a kind we read, a manifest is
            malformed, no image at all is found, or an ``include`` pattern matches no file.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise UsageError("no INPUT given; give image files, folders, zarr stores or a manifest (.txt / .csv)")
    if isinstance(channel, int) and channel < 0:
        raise UsageError(f"--channel must be >= 0 or a channel name, got {channel}")
    if isinstance(channel, str) and not channel.strip():
        raise UsageError("--channel is empty: give a channel index (0, 1, ...) or a channel name")
    check_inputs_exist(inputs)
    candidates: list[_Candidate] = []
    root_dirs: list[Path] = []
    for number, text in enumerate(inputs):
        found, root_dir = _collect_input(number, str(text), not_inputs)
        if not found:
            log.warning("%s: no images found there", text)
        candidates.extend(found)
        root_dirs.append(root_dir)
    candidates = _drop_duplicate_files(candidates)
    if not candidates:
        raise UsageError(
            f"no images found in {', '.join(map(str, inputs))}; accepted: PNG/JPEG/BMP/TIFF/OME-TIFF/SVS files, "
            "zarr/OME-Zarr stores, folders of them, manifests (.txt / .csv with a 'path' column)"
        )
    # ids first, from every file found: a file gets the same id whatever the filter (resume needs that)
    _assign_ids(candidates, root_dirs)
    if include:
        candidates = included(candidates, include)
    records = [record for candidate in candidates for record in _records(candidate)]
    records = _resolve_suffix_collisions(records)
    if channel is not None:
        records = [_check_channel(record, channel) for record in records]
        check_channel_name_exists(records, channel)
    return sorted(records, key=lambda r: r.image_id)


# --------------------------------------------------------------------------- inputs


def included(candidates: list[_Candidate], patterns: Sequence[str]) -> list[_Candidate]:
    """The candidates that an ``--include`` pattern matches: shell-style globs (``*``, ``?``,
    ``[...]``; case-sensitive, ``*`` also crosses ``/``) matched against a file's (or zarr
    store's) path relative to its INPUT folder (``B02/A01_s1_w1.tif``) and against its name.

    Raises:
        UsageError: a pattern matches none of the files found (a typo would otherwise silently
            segment less, or nothing).
    """
    matched: dict[str, int] = {pattern: 0 for pattern in patterns}
    kept = []
    for candidate in candidates:
        names = (candidate.rel, candidate.path.name)
        hits = [pattern for pattern in patterns if any(fnmatchcase(name, pattern) for name in names)]
        for pattern in hits:
            matched[pattern] += 1
        if hits:
            kept.append(candidate)
    unmatched = [pattern for pattern, count in matched.items() if count == 0]
    if unmatched:
        example = candidates[0].rel if candidates else ""
        raise UsageError(
            f"--include {unmatched[0]!r} matched none of the {len(candidates)} files found (e.g. {example!r}); patterns are "
            "matched against each file's path relative to its INPUT folder and against its name, e.g. --include '*_w1.tif'"
        )
    return kept



def check_inputs_exist(inputs: Sequence[str]) -> None:
    """Cheap check, before anything is loaded or written: every INPUT exists.

    Raises:
        UsageError: the first INPUT that does not exist (the message says where relative paths start).
    """
    for text in inputs:
        path = to_location(str(text))
        if not exists(path):
            where = "check the URL and the store's credentials" if is_remote(path) else f"check the path (relative paths are from {Path.cwd()})"
            raise UsageError(f"{text}: no such file or folder; {where}")


def _collect_input(number: int, text: str, not_inputs: NotInputs | None = None) -> tuple[list[_Candidate], Location]:
    """Candidates under one INPUT, and the folder whose name prefixes ids on collisions."""
    path = to_location(text)
    if path.is_dir():
        if _is_zarr_store(path) or path.suffix.lower() in ZARR_SUFFIXES:
            return [_Candidate(number, path, "zarr", path.name, strip_extension(path.name))], _resolved(path).parent
        return _walk(number, path, "", "", not_inputs), _resolved(path)
    suffix = path.suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        return _read_manifest(number, path, not_inputs), _resolved(path).parent
    kind = _kind_of(path.name)
    if kind is None:
        raise UsageError(
            f"{text}: not an image file, folder, zarr store or manifest; accepted file types: "
            f"{', '.join(sorted(PLAIN_SUFFIXES | TIFF_SUFFIXES))}, manifests {', '.join(sorted(MANIFEST_SUFFIXES))}"
        )
    return [_Candidate(number, path, kind, path.name, strip_extension(path.name))], _resolved(path).parent


def _walk_folders(top: Location) -> Iterator[tuple[Location, str, list[str], list[str]]]:
    """``os.walk`` of a local or object-store folder: ``(folder, path from top, dirnames,
    filenames)``, top-down; pruning ``dirnames`` in place skips those folders."""
    if is_remote(top):
        top.fs.invalidate_cache(top.path)
        root = top.path.rstrip("/")
        for dirpath, dirnames, filenames in top.fs.walk(top.path, on_error="omit"):
            rel = dirpath.rstrip("/")[len(root) :].strip("/")
            yield (top / rel if rel else top), rel, dirnames, filenames
        return

    def on_error(error: OSError) -> None:
        log.warning("cannot list %s (%s); its images are skipped", error.filename, error.strerror or error)

    for dirpath, dirnames, filenames in os.walk(top, onerror=on_error, followlinks=False):
        here = Path(dirpath)
        yield here, here.relative_to(top).as_posix(), dirnames, filenames


def _walk(number: int, top: Location, rel_prefix: str, id_prefix: str, not_inputs: NotInputs | None = None) -> list[_Candidate]:
    """Image files and zarr stores under a folder (no symlinked folders followed, hidden skipped).

    ``rel_prefix`` / ``id_prefix`` are prepended to the relative paths / ids (manifest
    entries that are folders). In a folder that has an ``images/`` subfolder (DSB and
    images/ + labels/ layouts), ``masks/`` and ``labels/`` are not searched and the
    ``images`` level is left out of ids; ``<id>/images/<id>.png`` gets the id ``<id>``.
    """
    found: list[_Candidate] = []
    id_dirs = {str(top): id_prefix}
    for here, rel_here, dirnames, filenames in _walk_folders(top):
        rel_dir = _join(rel_prefix, rel_here)
        id_dir = id_dirs.get(str(here), rel_dir)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if not_inputs is not None and _is_segment_output(here, not_inputs):
            dirnames[:] = [d for d in dirnames if d not in not_inputs.folders]
        if "images" in dirnames:
            dirnames[:] = [d for d in dirnames if d not in ANNOTATION_FOLDERS]
        for name in list(dirnames):
            child = here / name
            if _is_zarr_store(child) or name.lower().endswith(".zarr"):
                found.append(_Candidate(number, child, "zarr", _join(rel_dir, name), _join(id_dir, strip_extension(name))))
                dirnames.remove(name)
            elif linked_folder(child):
                dirnames.remove(name)  # os.walk would not enter it either; linked_folder says so
            else:
                id_dirs[str(child)] = id_dir if name == "images" else _join(id_dir, name)
        images = sorted((name, kind) for name in filenames if not name.startswith(".") and (kind := _kind_of(name)))
        dsb_sample = here.name == "images" and len(images) == 1 and strip_extension(images[0][0]) == here.parent.name
        for name, kind in images:
            base = id_dir if dsb_sample else _join(id_dir, strip_extension(name))
            found.append(_Candidate(number, here / name, kind, _join(rel_dir, name), base or here.parent.name))
    return found


def linked_folder(folder: Location) -> bool:
    """Whether ``folder``, a folder met *inside* an INPUT (or, for ``evaluate`` and ``train``, a
    DATA) folder, is a symbolic link: discovery never follows those (no loops, no image found
    twice), and logs each one it leaves (INFO). Links to files are followed, and so is an INPUT or
    DATA argument that is itself a link. Object stores have no links: always False there.

    The one rule of ``segment`` (:func:`discover_inputs`) and of the annotated-data discovery of
    ``evaluate`` / ``train`` (:func:`nucleibatch.annotated.discover_annotated`)."""
    if is_remote(folder) or not folder.is_symlink():
        return False
    log.info("%s: symbolic link to a folder, not followed", folder)
    return True


def followed_folder(path: Location) -> bool:
    """A folder inside an INPUT / DATA folder that discovery enters: a folder, not a link to one
    (:func:`linked_folder`, which logs the links it leaves)."""
    return path.is_dir() and not linked_folder(path)


def _read_manifest(number: int, manifest: Location, not_inputs: NotInputs | None = None) -> list[_Candidate]:
    """Entries of a .txt (one path per line) or .csv/.tsv (``path`` [, ``image_id``]) manifest."""
    folder = manifest.parent
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{manifest}: cannot read the manifest ({error})") from None
    entries: list[tuple[int, str, str | None]] = []  # (line, path, image_id)
    if manifest.suffix.lower() == ".txt":
        for line_number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((line_number, line, None))
    else:
        delimiter = "\t" if manifest.suffix.lower() == ".tsv" else ","
        rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        if "path" not in header:
            raise UsageError(f"{manifest}: a CSV manifest needs a header with a 'path' column (and optionally 'image_id'); found {header}")
        path_col = header.index("path")
        id_col = header.index("image_id") if "image_id" in header else None
        for line_number, row in enumerate(rows[1:], start=2):
            if not row or not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
                continue
            if len(row) <= path_col or not row[path_col].strip():
                raise UsageError(f"{manifest} line {line_number}: empty 'path'")
            image_id = row[id_col].strip() if id_col is not None and len(row) > id_col and row[id_col].strip() else None
            entries.append((line_number, row[path_col].strip(), image_id))
    found: list[_Candidate] = []
    for line_number, entry, image_id in entries:
        path = to_location(entry) if "://" in entry or Path(entry).is_absolute() else folder / entry
        try:
            rel = _relative(path, folder)
        except (ValueError, OSError, RuntimeError):  # outside the manifest's folder (or a symlink loop): its name
            rel = path.name
        where = f"listed in {manifest.name} line {line_number}"
        if image_id is not None:
            image_id = PurePosixPath(image_id.replace("\\", "/")).as_posix()
        if not path.exists() and (is_remote(path) or not path.is_symlink()):
            found.append(_Candidate(number, path, _kind_of(path.name) or "plain", rel, image_id or strip_extension(rel), image_id, f"file not found ({where})"))
        elif path.is_dir() and not (_is_zarr_store(path) or path.suffix.lower() in ZARR_SUFFIXES):
            found.extend(_walk(number, path, rel, image_id or rel, not_inputs))
        elif path.is_dir():
            found.append(_Candidate(number, path, "zarr", rel, image_id or strip_extension(rel), image_id))
        else:
            kind = _kind_of(path.name)
            error = None if kind else f"not an image file ({where}); accepted: {', '.join(sorted(PLAIN_SUFFIXES | TIFF_SUFFIXES))}"
            found.append(_Candidate(number, path, kind or "plain", rel, image_id or strip_extension(rel), image_id, error))
    return found


# --------------------------------------------------------------------------- ids


def _assign_ids(candidates: list[_Candidate], root_dirs: list[Location]) -> None:
    """Give every candidate a unique id prefix (probing may add ``#...`` suffixes)."""
    fixed = defaultdict(list)
    for candidate in candidates:
        if candidate.fixed_id is not None:
            fixed[candidate.fixed_id].append(candidate)
    repeated = sorted(i for i, group in fixed.items() if len(group) > 1)
    if repeated:
        raise UsageError(f"image_id {repeated[0]!r} is given to {len(fixed[repeated[0]])} manifest entries; image ids must be unique")
    # within one input: files that would share an id keep their extension
    for number in sorted({c.root for c in candidates}):
        group = [c for c in candidates if c.root == number]
        counts = defaultdict(int)
        for candidate in group:
            counts[candidate.fixed_id or candidate.base] += 1
        for candidate in group:
            if candidate.fixed_id is not None:
                candidate.image_id = candidate.fixed_id
            elif counts[candidate.base] > 1 or candidate.base in fixed:
                candidate.image_id = candidate.rel
            else:
                candidate.image_id = candidate.base
    # across inputs: prefix every id of the colliding inputs with the input folder's name
    # (its last 2, 3... path parts if the names are equal too)
    by_id = defaultdict(set)
    for candidate in candidates:
        by_id[candidate.image_id].add(candidate.root)
    clashing = sorted({n for roots in by_id.values() if len(roots) > 1 for n in roots})
    if not clashing:
        return
    for depth in range(1, 64):
        prefixes = {n: "/".join(root_dirs[n].parts[-depth:]).lstrip("/") for n in clashing}
        if len(set(prefixes.values())) == len(prefixes) or depth >= max(len(root_dirs[n].parts) for n in clashing):
            break
    for candidate in candidates:
        if candidate.root in prefixes:
            candidate.image_id = _join(prefixes[candidate.root], candidate.image_id)
    twice = sorted(i for i, count in Counter(c.image_id for c in candidates).items() if count > 1)
    if twice:
        raise UsageError(f"image id {twice[0]!r} comes from more than one input; give each folder once, or list the files in a CSV manifest with an image_id column")


def _records(candidate: _Candidate) -> list[ImageRecord]:
    """Probe one candidate and make its records.

    ``image_id``, ``source`` and ``error`` are made printable on one line (file-name bytes
    that are not UTF-8 become ``\\xNN``, a newline ``\\n``: :func:`~.readers.files.printable`);
    ``path`` stays the name the file system knows, to open the file.
    """
    path = str(candidate.path)
    stamp = fingerprint(candidate.path)  # before the header is read: a change from now on is seen by the next run
    if candidate.error:
        return [ImageRecord(printable(candidate.image_id), printable(path), path, candidate.kind, None, None, None, {}, printable(candidate.error), fingerprint=stamp)]
    probed: list[ProbedImage] = probe(candidate.path, candidate.kind)
    per_node = defaultdict(int)
    for image in probed:
        per_node[image.node] += 1
    records = []
    for image in probed:
        image_id, source = candidate.image_id, path
        if image.node:
            image_id, source = f"{image_id}/{image.node}", f"{source}/{image.node}"
        if per_node[image.node] > 1 and image.parts:
            image_id += "#" + "-".join(f"{'s' if name == 'series' else name}{value}" for name, value in image.parts)
            source += "#" + ",".join(f"{name}={value}" for name, value in image.parts)
        error = printable(image.error) if image.error else None
        plate = well = field_path = None
        if image.plate is not None:
            plate_node, well, field_path = image.plate
            plate, well, field_path = printable(_join(candidate.image_id, plate_node)), printable(well), printable(field_path)
        names = tuple(printable(name) for name in image.channel_names) if image.channel_names else None
        records.append(
            ImageRecord(
                printable(image_id), printable(source), path, image.kind or candidate.kind, image.shape, image.channels, image.dtype, image.selector, error,
                image.pixel_size_um, stamp, plate=plate, well=well, field=field_path, channel_names=names,
            )
        )  # fmt: skip
    return records


def _resolve_suffix_collisions(records: list[ImageRecord]) -> list[ImageRecord]:
    """Make ids unique in the rare case a suffixed id equals another file's id (``a#t1.png``)."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for record in records:
        seen[record.image_id] += 1
        if seen[record.image_id] > 1:
            record = replace(record, image_id=f"{record.image_id}~{seen[record.image_id]}")
        out.append(record)
    return out


def _check_channel(record: ImageRecord, channel: int | str) -> ImageRecord:
    """The record, or the record failed with why ``--channel`` (an index, or a name resolved
    against its channel names) does not fit it."""
    if record.error or record.channels is None:
        return record
    if isinstance(channel, str):
        try:
            resolve_channel(channel, record.channel_names, record.channels)
        except ImageReadError as error:
            return replace(record, error=str(error))
        return record
    if channel < record.channels:
        return record
    return replace(record, error=f"--channel {channel} asked for, but the image has {record.channels} channel(s) (0..{record.channels - 1})")


def check_channel_name_exists(records: Sequence[ImageRecord], channel: int | str | None) -> None:
    """A ``--channel NAME`` that no readable input has is a usage error (a typo, most likely), not
    one failed row per image.

    Raises:
        UsageError: names the channel names the inputs do have.
    """
    if not isinstance(channel, str):
        return
    readable = [r for r in records if r.channels is not None]
    if not readable or any(find_channel(channel, r.channel_names) is not None for r in readable):
        return
    seen = sorted({name for r in readable for name in (r.channel_names or ()) if name})
    offer = f"the inputs' channels are named {', '.join(seen)}" if seen else "no input names its channels (OME-TIFF Channel Name, OME-Zarr omero labels): give an index"
    raise UsageError(f"--channel {channel!r}: no input image has a channel of that name; {offer}")


# --------------------------------------------------------------------------- helpers


def strip_extension(name: str) -> str:
    """``a/b.ome.tif`` -> ``a/b``; ``x.png`` -> ``x``; names without a known extension unchanged."""
    lower = name.lower()
    for suffix in DOUBLE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    stem, ext = os.path.splitext(name)
    if stem and ext.lower() in PLAIN_SUFFIXES | TIFF_SUFFIXES | ZARR_SUFFIXES:
        return stem
    return name


def _kind_of(name: str) -> str | None:
    suffix = os.path.splitext(name)[1].lower()
    if suffix in PLAIN_SUFFIXES:
        return "plain"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    return None


def _is_zarr_store(path: Location) -> bool:
    """Whether ``path`` holds zarr metadata (False for a folder that cannot be looked into: the
    walk then reports it unlistable and skips it)."""
    return any(_exists_safely(path / name, "is_file") for name in ZARR_METADATA)


def _exists_safely(path: Location, test: str) -> bool:
    """``path.is_file()`` / ``path.is_dir()`` that says False where permissions hide the answer."""
    try:
        return bool(getattr(path, test)())
    except OSError:
        return False


def _key(path: Location) -> str:
    """A folder's identity for comparisons (local: absolute, symlinks resolved)."""
    try:
        return str(_resolved(path))
    except (OSError, RuntimeError):
        return str(path)


def _is_segment_output(folder: Location, not_inputs: NotInputs) -> bool:
    """Whether ``folder`` is the run's own OUT or another `nucleibatch segment` OUT: its output
    folders are then left out of the search."""
    if _key(folder) == not_inputs.own_key or _exists_safely(folder / not_inputs.marker, "is_dir"):
        log.info("%s: the OUT of `nucleibatch segment`: its %s are not searched for images", folder, ", ".join(sorted(not_inputs.folders)))
        return True
    return False


def _resolved(path: Location) -> Location:
    """The absolute, symlink-free path of a local file (object-store URLs are already absolute)."""
    return path if is_remote(path) else path.resolve()


def _relative(path: Location, folder: Location) -> str:
    """``path`` relative to ``folder`` in posix form; ValueError when it lies elsewhere."""
    if not is_remote(path) and not is_remote(folder):
        return path.resolve().relative_to(folder.resolve()).as_posix()
    inside, base = str(path), str(folder).rstrip("/") + "/"
    if not inside.startswith(base):
        raise ValueError(f"{path} is not under {folder}")
    return inside[len(base) :]


def _join(prefix: str, rest: str) -> str:
    parts = [p for p in (prefix, rest) if p and p != "."]
    return "/".join(parts)


def _drop_duplicate_files(candidates: list[_Candidate]) -> list[_Candidate]:
    """The same file reached twice (given twice, or in a folder and a manifest): keep the first."""
    seen: set[str] = set()
    kept = []
    for candidate in candidates:
        try:
            key = str(_resolved(candidate.path))
        except (OSError, RuntimeError):  # symlink loops
            key = str(candidate.path.absolute())
        if key in seen:
            log.info("%s: reached twice, discovered once", candidate.path)
            continue
        seen.add(key)
        kept.append(candidate)
    return kept
