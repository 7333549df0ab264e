"""Where things are: the one reading of the locations a declaration names (storage roots,
corpus and seed folders, evaluation sets, model folders).

A location is a local path (absolute, or ``~/...``), a ``file://`` URI of one, or an
``s3://bucket/prefix``. Anything else is refused with a message that says what would do. A
relative path is refused here: the component resolves it against the dg project root when
the declaration loads, so that a webserver, a daemon and a run worker started in different
folders all read and write the same place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"


class LocationError(ValueError):
    """A declared location that bft cannot use, and why."""


@dataclass(frozen=True)
class Location:
    uri: str  # as a user reads it: an absolute local path, or s3://bucket/prefix

    @property
    def on_s3(self) -> bool:
        return self.uri.startswith(S3_SCHEME)

    @property
    def path(self) -> Path:
        if self.on_s3:
            raise LocationError(f"{self.uri} is on S3, not a local path")
        return Path(self.uri)


def parse_location(uri: str, what: str = "location") -> Location:
    """``uri`` read once: s3://bucket/prefix as is, file:///x and ~/x as absolute local paths;
    a relative path, another scheme or a file:// URI naming a host is refused."""
    if not isinstance(uri, str) or not uri.strip():
        raise LocationError(f"{what}: an empty location")
    if uri.startswith(S3_SCHEME):
        bucket = uri[len(S3_SCHEME) :].split("/", 1)[0]
        if not bucket:
            raise LocationError(f"{what} {uri!r}: names no bucket (s3://bucket/prefix)")
        return Location(uri.rstrip("/") if uri.count("/") > 2 else uri)
    if uri.startswith(FILE_SCHEME):
        rest = uri[len(FILE_SCHEME) :]
        if not rest.startswith("/"):
            raise LocationError(
                f"{what} {uri!r}: a file:// URI must name an absolute path (file:///data/x)"
            )
        uri = rest
    elif "://" in uri:
        raise LocationError(
            f"{what} {uri!r}: unsupported scheme; use a folder, file:///path or s3://bucket/prefix"
        )
    path = Path(uri).expanduser()
    if not path.is_absolute():
        raise LocationError(
            f"{what} {uri!r} is relative: in a defs.yaml bft resolves it against the dg project "
            "root; elsewhere give an absolute path"
        )
    return Location(str(path))


def resolve_against(uri: str, root: Path) -> str:
    """A relative local path made absolute against ``root`` (the dg project root); other
    locations as they are."""
    if "://" in uri or uri.startswith(("/", "~")) or uri.startswith("bft:"):
        return uri
    return str((root / uri).resolve())
