"""What every reader shares about files: the suffixes of image files, the first bytes that
tell a file's format (the bytes, not the extension, choose the decoder), and one-line printable
messages (file names may hold bytes that are not UTF-8, errors may span lines)."""

from __future__ import annotations

import stat

from ..location import Location, is_remote, open_binary

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = PIL_SUFFIXES | TIFF_SUFFIXES
# Bytes read from the start of a file to tell its format and check its header.
HEAD_BYTES = 64


def sniff_format(head: bytes) -> str | None:
    """The format of a file from its first bytes: ``"tiff"``, ``"png"``, ``"jpeg"``,
    ``"gif"``, ``"bmp"``, or None when the bytes are none of these."""
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    return None


def read_head(path: Location) -> tuple[str | None, int, bytes]:
    """``(error, size, first HEAD_BYTES bytes)`` of a file; ``error`` says why it cannot be
    read (cannot open, not a regular file, empty), else None."""
    try:
        info = path.stat()
    except OSError as error:
        return f"cannot open ({error.strerror or error})", 0, b""
    if not is_remote(path) and not stat.S_ISREG(info.st_mode):
        kind = "a named pipe" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode) else "special"
        return f"not a regular file ({kind}); give the image file itself", 0, b""
    size = int(info.st_size)
    if size == 0:
        return "empty file (0 bytes)", 0, b""
    try:
        with open_binary(path) as handle:
            head = handle.read(HEAD_BYTES)
    except OSError as error:
        return f"cannot open ({error.strerror or error})", size, b""
    return None, size, head


def printable(text: str) -> str:
    """``text`` with what cannot be shown on one line escaped: file-name bytes that are not
    UTF-8 (Python's surrogate escapes) as ``\\xNN``, control and other unprintable characters
    (newline, tab, ...) as ``\\n``, ``\\t``, ``\\x1b``, ``\\u200b``. Printable text (any
    script, spaces included) is unchanged."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if "\udc80" <= char <= "\udcff":
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif char.isprintable():
            out.append(char)
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def one_line(error: BaseException) -> str:
    """The first line of an exception's message, printable (:func:`printable`), at most 200 characters."""
    text = str(error).strip().splitlines()
    return printable(text[0])[:200] if text else type(error).__name__
