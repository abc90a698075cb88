"""HTTP byte ranges (RFC 9110 §14): one range per request, what audio players ask for when they seek."""

from __future__ import annotations

import re

from backend.lib.problems import Problem

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeNotSatisfiable(Problem):
    """The range starts past the end of the content."""

    status = 416
    kind = "range-not-satisfiable"
    title = "Range not satisfiable"


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (start, end) the `Range` header asks for, or None to send everything.

    Several ranges, or a header we do not understand, are answered with the whole content (allowed by
    the RFC); a range past the end is 416 with `Content-Range: bytes */<size>`.
    """
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        length = int(last)
        if length == 0:
            raise RangeNotSatisfiable("An empty suffix range", headers={"Content-Range": f"bytes */{size}"})
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise RangeNotSatisfiable(
            f"The content has {size} bytes; the range starts at {start}", headers={"Content-Range": f"bytes */{size}"}
        )
    return start, end
