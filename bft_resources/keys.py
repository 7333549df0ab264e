"""Partition keys and names that become parts of a path.

A shard partition key can be added by anyone who reaches the UI or GraphQL, and every
partitioned asset turns its key into a file name. A key is accepted only as one safe path
segment: letters, digits and ``. _ - + = @`` (and spaces inside), no ``..``, no leading dot,
no separator, no control character; what the shard naming produces (``cc_en_head.0001``)
passes. The check runs where keys are made (discovery) and again where they become paths
(storage), so a key added by hand cannot reach the file system either.
"""

import re

_SEGMENT = re.compile(r"[\w+=@-][\w.+=@ -]*", re.ASCII)
MAX_SEGMENT_BYTES = 200
# A declared name (a key prefix, a recipe) becomes part of path segments with more appended
# (``<recipe>.step<N>.<run>.summary.parquet``): ASCII, and at most this long, so that every
# segment made from it stays within MAX_SEGMENT_BYTES. The declaration is checked against it
# when it loads, not when storage first refuses a path.
MAX_NAME_CHARS = 64


class UnsafeKeyError(ValueError):
    """A partition key or name that cannot safely become part of a path."""


def unsafe_reason(segment: str) -> str | None:
    """Why ``segment`` cannot be one path segment, or None when it can."""
    if not segment:
        return "it is empty"
    if len(segment.encode()) > MAX_SEGMENT_BYTES:
        return f"it is longer than {MAX_SEGMENT_BYTES} bytes"
    if ".." in segment:
        return "it contains '..'"
    if segment != segment.strip():
        return "it starts or ends with white space"
    if not _SEGMENT.fullmatch(segment):
        return "only letters, digits, spaces inside and . _ - + = @ are allowed (no separator, control character or leading dot)"
    return None


def safe_segment(segment: str, what: str = "partition key") -> str:
    """``segment`` itself, or UnsafeKeyError saying why it is refused."""
    reason = unsafe_reason(segment)
    if reason is not None:
        raise UnsafeKeyError(f"refused {what} {segment!r}: {reason}")
    return segment


def safe_relative(path: str, what: str = "table name") -> str:
    """A relative path whose every segment is safe (an asset key path such as ``web/seed_examples``)."""
    for segment in path.split("/"):
        safe_segment(segment, what)
    return path
