"""Checkpoint manifests that vouch for every file: a checkpoint is whole when its
``manifest.json`` exists, and intact when every file still has the hash the manifest lists."""

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"  # a checkpoint is whole once its manifest exists
FILES = "files"  # manifest entry: relative path -> sha256
_CHUNK = 1 << 22


class CheckpointCorrupt(RuntimeError):
    """A checkpoint file that is missing or no longer has the hash its manifest lists."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".bft-")
    )


def _verified_record(folder: Path) -> Path:
    """Where this machine remembers the size and mtime of each file of ``folder`` when its
    hash last matched (outside the checkpoint, which stays exactly what was trained)."""
    cache = Path(os.environ.get("BFT_VERIFY_CACHE", "~/.cache/bft/verified")).expanduser()
    return cache / f"{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]}.json"


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` into ``folder`` with the sha256 of every other file."""
    hashes = {p.relative_to(folder).as_posix(): _sha256(p) for p in _files(folder)}
    whole = {**manifest, FILES: hashes}
    (folder / MANIFEST).write_text(json.dumps(whole, indent=2))
    return whole


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def verify_checkpoint(folder: Path) -> None:
    """Check every file the manifest lists against its hash (files unchanged since the last
    check, by size and mtime, are not hashed again) and refuse files it does not list.
    CheckpointCorrupt names the file."""
    manifest = json.loads((folder / MANIFEST).read_text())
    hashes = manifest.get(FILES)
    if not hashes:
        raise CheckpointCorrupt(
            f"{folder / MANIFEST} lists no file hashes (written before bft verified checkpoints): "
            "materialize the checkpoint again"
        )
    unlisted = sorted(p.relative_to(folder).as_posix() for p in _files(folder))
    unlisted = [name for name in unlisted if name not in hashes]
    if unlisted:
        # A file added after training (an adapter_config.json, a stray config) would change
        # what loads without the manifest vouching for it.
        raise CheckpointCorrupt(
            f"{folder / unlisted[0]}: in the checkpoint folder but not in its {MANIFEST} "
            f"({len(unlisted)} such file(s)); remove it, or train the checkpoint again"
        )
    record = _verified_record(folder)
    try:
        verified = json.loads(record.read_text())
    except (OSError, ValueError):
        verified = {}
    for name, expected in sorted(hashes.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointCorrupt(f"{path}: listed in {MANIFEST} but missing")
        if verified.get(name) == _stamp(path):
            continue
        if _sha256(path) != expected:
            raise CheckpointCorrupt(
                f"{path}: contents differ from the sha256 in {MANIFEST} (corrupt or overwritten)"
            )
        verified[name] = _stamp(path)
    # A read-only copy is verified again next time, never trusted blindly.
    with contextlib.suppress(OSError):
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(verified))
