"""The optional dependencies (pip extras) and the one-line error when one is missing."""

from __future__ import annotations

import importlib.util

from .errors import MissingExtraError

# extra -> the top-level modules it provides
EXTRAS: dict[str, tuple[str, ...]] = {
    "ray": ("ray",),
    "dask": ("dask", "distributed"),
}


def require_extra(extra: str, feature: str, alternative: str = "") -> None:
    """Raise :class:`MissingExtraError` unless the modules of ``extra`` are importable.

    Checks with ``importlib.util.find_spec`` (nothing is imported), so it is cheap enough to run
    before any work starts.

    Args:
        extra: a key of :data:`EXTRAS`.
        feature: what needs it, as the user asked for it (e.g. ``"--engine ray"``).
        alternative: what works without it (e.g. ``"--engine local"``), appended to the message.
    """
    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        instead = f", or use {alternative}" if alternative else ""
        raise MissingExtraError(f"{feature} needs {', '.join(missing)}, which this Python does not have: pip install 'nucleibatch[{extra}]'{instead}")
