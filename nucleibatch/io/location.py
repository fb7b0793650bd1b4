"""Where inputs and outputs live: local paths, ``file://`` URLs, or fsspec URLs (``s3://``, ``gs://``...).

A location is a :class:`pathlib.Path` on a local filesystem and a :class:`upath.UPath` on an
object store; both answer ``/``, ``name``, ``exists()``, ``is_dir()``, ``open()``... The few
operations whose semantics differ (listing another process's writes, deleting trees, handing a
store to zarr) go through the functions here, so the rest of the code does not branch on where
data lives (atomic writes of OUT's files: :mod:`nucleibatch.output.atomic`).

Credentials and endpoints of object stores come from the usual environment of the store's
fsspec driver (for s3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
``~/.aws``, instance profiles), so every worker process of a cluster finds them the same way.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

from upath import UPath

from ..errors import UsageError

Location = Path | UPath


def is_url(text: str | os.PathLike) -> bool:
    """True for ``scheme://...`` text other than a local ``file://`` URL."""
    value = str(text)
    return "://" in value and urlparse(value).scheme not in ("", "file")


def to_location(text: str | os.PathLike) -> Location:
    """A path, ``file://`` URL or fsspec URL as a location.

    Raises:
        UsageError: a ``file://`` URL with a host, or a URL scheme with no fsspec driver
            installed (the message names the package to install).
    """
    if isinstance(text, Path):
        return text
    if isinstance(text, UPath):
        return text
    value = str(text)
    if "://" not in value:
        return Path(value)
    url = urlparse(value)
    if url.scheme == "file":
        if url.netloc not in ("", "localhost"):
            raise UsageError(f"{value}: a file:// URL names a local path (file:///data/x); for another host mount its folder")
        return Path(unquote(url.path))
    import fsspec

    try:
        fsspec.get_filesystem_class(url.scheme)
    except (ImportError, ValueError) as error:
        raise UsageError(f"{value}: no filesystem driver for {url.scheme}:// ({error}); install it (s3://: pip install 'nucleibatch[s3]', gs://: gcsfs, az://: adlfs)") from None
    return UPath(value)


def exists(location: Location) -> bool:
    """Whether ``location`` exists; an object store that cannot be reached is a usage error.

    Raises:
        UsageError: missing credentials, unknown bucket endpoint, access denied... with the
            store's own one-line reason and where credentials come from.
    """
    if not is_remote(location):
        return location.exists()
    try:
        location.fs.invalidate_cache(location.path)
        return location.exists()
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise UsageError(
            f"{location}: cannot reach the store ({type(error).__name__}: {reason}); give it credentials and an "
            "endpoint the usual way for its fsspec driver (s3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
            "AWS_ENDPOINT_URL or ~/.aws), on every node of a cluster"
        ) from None


def is_remote(location: Location) -> bool:
    """True for an object-store location (no local file behind it: no rename, no flock, no mmap)."""
    return not isinstance(location, Path)


def text_of(location: Location) -> str:
    """The path or URL as users wrote it (``s3://bucket/key``, ``/data/x``)."""
    return str(location)


def fresh_listing(folder: Location, pattern: str = "*") -> list[Location]:
    """Entries of ``folder`` matching ``pattern``, sorted, including what other processes just wrote.

    fsspec caches object-store listings per process; the cache is dropped first so that rows
    written by workers elsewhere are seen. A missing folder lists as empty.
    """
    if is_remote(folder):
        folder.fs.invalidate_cache(folder.path)
    try:
        if not folder.is_dir():
            return []
        return sorted(folder.glob(pattern), key=str)
    except FileNotFoundError:
        return []


def read_many(paths: list[Location]) -> dict[str, bytes | None]:
    """Contents by ``str(path)`` (None for a file that vanished or cannot be read); an object
    store fetches them concurrently."""
    if not paths:
        return {}
    if is_remote(paths[0]):
        fs = paths[0].fs
        found = fs.cat([p.path for p in paths], on_error="return")
        return {str(p): (None if isinstance(found.get(p.path), Exception) else found.get(p.path)) for p in paths}
    contents: dict[str, bytes | None] = {}
    for path in paths:
        try:
            contents[str(path)] = path.read_bytes()
        except OSError:
            contents[str(path)] = None
    return contents


def remove(path: Location) -> None:
    """Delete a file or a folder tree; nothing happens when it does not exist."""
    if is_remote(path):
        fs = path.fs
        fs.invalidate_cache(path.path)
        if fs.exists(path.path):
            fs.rm(path.path, recursive=True)
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def make_dirs(path: Location) -> None:
    """Create a local folder (and parents); object stores have no folders to create."""
    if not is_remote(path):
        path.mkdir(parents=True, exist_ok=True)


def open_binary(path: Location) -> IO[bytes]:
    """A seekable binary file object for reading (the caller closes it)."""
    return path.open("rb")


def fingerprint(location: Location) -> str | None:
    """What changes when an input changes: size and modification time of a file; of a zarr
    store, those of its root metadata file; of an object, its size and ETag. None when it cannot
    be read (a vanished input)."""
    try:
        if is_remote(location):
            location.fs.invalidate_cache(location.path)
            target = location
            if location.is_dir():
                target = next((location / n for n in ("zarr.json", ".zattrs", ".zgroup", ".zarray") if (location / n).exists()), location)
            info = target.fs.info(target.path)
            return f"{info.get('size')}:{info.get('ETag') or info.get('LastModified') or info.get('mtime')}"
        target = location
        if location.is_dir():
            target = next((location / n for n in ("zarr.json", ".zattrs", ".zgroup", ".zarray") if (location / n).is_file()), location)
        stat = target.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    except (OSError, ValueError):
        return None


def file_size(path: Location) -> int | None:
    """Size in bytes of one file (None when it does not exist)."""
    try:
        if is_remote(path):
            path.fs.invalidate_cache(path.path)
            return int(path.fs.info(path.path)["size"])
        return path.stat().st_size
    except (FileNotFoundError, KeyError):
        return None


def file_sizes(folder: Location) -> dict[str, int]:
    """Size of every file under ``folder``, by posix path relative to it (empty when missing)."""
    if is_remote(folder):
        folder.fs.invalidate_cache(folder.path)
        root = folder.path.rstrip("/") + "/"
        try:
            found = folder.fs.find(folder.path, detail=True)
        except FileNotFoundError:
            return {}
        return {key[len(root) :]: int(info.get("size") or 0) for key, info in found.items() if key.startswith(root)}
    sizes = {}
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                sizes[os.path.relpath(path, folder).replace(os.sep, "/")] = os.stat(path).st_size
            except OSError:
                continue
    return sizes


def zarr_store(path: Location, read_only: bool = False) -> Any:
    """What ``zarr.open*`` needs for ``path``: the local path, or an fsspec store for a URL."""
    if not is_remote(path):
        return str(path)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(str(path), storage_options=dict(path.storage_options) or None, read_only=read_only)
