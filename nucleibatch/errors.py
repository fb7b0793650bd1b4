"""The project's exceptions. Each message says what went wrong and how to fix it.

`exit_code` is what the CLI returns when such an error stops a command:
2 for usage errors (bad arguments, bad settings), 1 for anything else.
"""

from __future__ import annotations

import errno


class NucleibatchError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1


class UsageError(NucleibatchError):
    """Bad command-line arguments or settings: the user must change the call."""

    exit_code = 2


class BadAnnotationError(NucleibatchError):
    """An annotated training/evaluation image is unusable (names the file and the problem)."""


class ImageReadError(NucleibatchError):
    """An input image cannot be read or is not a 2-D image we can segment."""


class ModelBundleError(NucleibatchError):
    """A model bundle is missing, incomplete or does not match its config."""


class ModelNotFoundError(ModelBundleError, UsageError):
    """``--model`` names neither a shipped bundle nor a folder holding one (a usage error: exit 2)."""


class ObjectTooLargeError(NucleibatchError):
    """A nucleus is larger than the stitching margin: raise `--block-margin`."""


class NotSegmentOutputError(UsageError):
    """A folder given as OUT (report, export) is missing or is not the output of ``nucleibatch segment``."""


class MissingExtraError(UsageError):
    """A feature needs an optional dependency that is not installed (names the pip extra)."""


class OutputError(NucleibatchError):
    """The output directory cannot be used (locked, written by other settings, not writable)."""


class ExportError(NucleibatchError):
    """OUT is inconsistent (a table names an image or nucleus that masks.zarr lacks): ``export`` stops (exit 1)."""


def is_fatal(error: BaseException) -> bool:
    """Errors about the output side (disk full, read-only, quota) or memory stop a run; an
    image's own errors (unreadable, too small) fail only that image."""
    return isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT))
