"""The DATA payload of an SMTP transaction, produced piece by piece. Pure.

SMTP carries lines ending in CRLF, with a leading dot doubled and a final
`.` line. A bare CR or LF is turned into CRLF (nothing else may change; a
bare CR smuggled into a header is refused earlier). The message is never copied
whole: each piece is a slice of at most a few hundred KiB, so a 25 MB message
costs little more than itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

PIECE = 64 * 1024  # a piece ends at the first line end after this many bytes
_LINE_END = re.compile(rb"\r\n|\r|\n")


def _crlf(piece: bytes) -> bytes:
    crlf = piece.count(b"\r\n")
    if piece.count(b"\r") == crlf and piece.count(b"\n") == crlf:
        return piece  # already clean: the common case costs three scans, no copy
    return _LINE_END.sub(b"\r\n", piece)


def data_pieces(prefix: bytes, raw: bytes, piece: int = PIECE) -> Iterator[bytes]:
    """`prefix + raw` as sent after DATA, ending with the terminating `.` line."""
    at_line_start = True
    for source in (prefix, raw):
        start, size = 0, len(source)
        while start < size:
            newline = source.find(b"\n", start + piece)
            end = size if newline < 0 else newline + 1
            if end - start > 4 * piece:  # a longer line is cut, never between CR and LF
                end = start + piece
                if source[end - 1 : end + 1] == b"\r\n":
                    end += 1  # keep CR and LF together
            chunk = _crlf(source[start:end])
            chunk = chunk.replace(b"\n.", b"\n..")
            if at_line_start and chunk.startswith(b"."):
                chunk = b"." + chunk
            at_line_start = chunk.endswith(b"\n")
            yield chunk
            start = end
    if not at_line_start:
        yield b"\r\n"
    yield b".\r\n"
