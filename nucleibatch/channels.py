"""Channel names (pure): ``--channel`` given by name, and the per-channel columns of nuclei.parquet.

Rules (documented in docs/inputs.md and ``segment --help``):

* **Column names.** A multi-channel image adds ``mean_intensity_<suffix>`` per channel. The suffix
  is the channel's name from the file (OME-XML ``Channel Name``, OME-Zarr ``omero.channels[].label``)
  with every run of characters other than ASCII letters, digits and ``_`` replaced by one ``_``
  and leading/trailing ``_`` dropped, case kept (``"Alexa Fluor 488"`` -> ``Alexa_Fluor_488``);
  a channel without a name (or whose name is left empty) gets ``c<index>`` (``c0``, ``c1``...).
  Suffixes that would repeat get ``_c<index>`` appended; if they still repeat, every channel of the
  image is named by index.
* **Colour images get no per-channel columns.** 3 or 4 channels of 8-bit pixels (``uint8``) with
  no channel names are one colour picture (H&E or other brightfield RGB, an RGB(A) PNG/JPEG, a
  colour composite), not marker channels: its R, G and B means measure the colour, not a marker.
  Name the channels in the file (OME) to have them measured anyway.
* **``--channel NAME``** matches a channel's name exactly, else case-insensitively when exactly one
  name matches. An all-digit ``--channel`` is an index.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from .errors import ImageReadError

INTENSITY_PREFIX = "mean_intensity_"
_NOT_SAFE = re.compile(r"[^A-Za-z0-9_]+")


def parse_channel(text: str | int | None) -> int | str | None:
    """``--channel``'s value: an int for an index (all digits, e.g. ``"2"``), else the name as given.

    A leading ``-`` followed by digits stays an int (negative: refused at discovery with the fix).
    """
    if text is None or isinstance(text, int):
        return text
    stripped = text.strip()
    if re.fullmatch(r"-?\d+", stripped):
        return int(stripped)
    return text


def sanitise(name: str) -> str:
    """A channel name as a column-name suffix: runs of characters other than ``[A-Za-z0-9_]``
    become ``_``, leading and trailing ``_`` are dropped (may return ``""``)."""
    return _NOT_SAFE.sub("_", name).strip("_")


def is_colour(channels: int, dtype: str | np.dtype, names: Sequence[str] | None) -> bool:
    """An unnamed 3- or 4-channel 8-bit image: one colour picture (RGB / RGBA), not marker channels."""
    return channels in (3, 4) and np.dtype(dtype) == np.uint8 and not any(names or ())


def intensity_suffixes(channels: int, dtype: str | np.dtype, names: Sequence[str] | None = None) -> tuple[str, ...]:
    """The column suffixes of the per-channel means of an image (``mean_intensity_<suffix>``).

    Args:
        channels: ``C``, the image's channel count.
        dtype: its pixel dtype.
        names: per channel its name from the file, ``""`` (or None as a whole) where unknown.

    Returns:
        ``C`` unique suffixes (module rules); ``()`` for a one-channel image and a colour image.
    """
    if channels < 2 or is_colour(channels, dtype, names):
        return ()
    given = list(names) if names is not None and len(names) == channels else [""] * channels
    suffixes = [sanitise(name or "") or f"c{i}" for i, name in enumerate(given)]
    counts = Counter(suffixes)
    suffixes = [f"{s}_c{i}" if counts[s] > 1 else s for i, s in enumerate(suffixes)]
    if len(set(suffixes)) < channels:
        suffixes = [f"c{i}" for i in range(channels)]
    return tuple(suffixes)


def intensity_columns(suffixes: Sequence[str]) -> tuple[str, ...]:
    """The nuclei.parquet column names for :func:`intensity_suffixes`."""
    return tuple(INTENSITY_PREFIX + s for s in suffixes)


def find_channel(channel: str, names: Sequence[str] | None) -> int | None:
    """The index of the channel called ``channel`` among ``names`` (exact, else the one
    case-insensitive match), or None when there is none or more than one."""
    if not names:
        return None
    exact = [i for i, name in enumerate(names) if name == channel]
    if len(exact) == 1:
        return exact[0]
    folded = [i for i, name in enumerate(names) if name and name.casefold() == channel.casefold()]
    return folded[0] if len(folded) == 1 else None


def describe_names(names: Sequence[str] | None, channels: int | None) -> str:
    """What an image offers to ``--channel``, for error messages: ``"channels DAPI (0), GFP (1)"``."""
    if channels is None:
        return "no channels known"
    if not names or not any(names):
        return f"{channels} unnamed channel(s): give an index 0..{channels - 1}"
    return "channels " + ", ".join(f"{name or '(unnamed)'} ({i})" for i, name in enumerate(names))


def resolve_channel(channel: int | str | None, names: Sequence[str] | None, channels: int | None) -> int | None:
    """``--channel`` for one image: an index as it is, a name as its index among ``names``.

    Raises:
        ImageReadError: a name this image has no channel of (the message lists what it has);
            the image fails, the others go on.
    """
    if channel is None or isinstance(channel, int):
        return channel
    found = find_channel(channel, names)
    if found is None:
        raise ImageReadError(f"--channel {channel!r}: the image has no channel of that name ({describe_names(names, channels)})")
    return found
