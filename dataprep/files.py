"""Files written whole or not at all, and their checksums: the one way fastrsb writes a file that matters (checkpoints,
exported weights, a run's config.json and launch.json; the converter's .beton files, shards, sidecars and manifest),
used by the converter and the training core alike."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable


def sha256_file(path: str | Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], object], durable: bool = True) -> None:
    """Make `path` appear whole or not at all: write(tmp) fills the temporary sibling `.NAME.partial`,
    which is renamed over path. durable: the file's data is fsynced before the rename and the directory
    after it, so a crash or power loss right after leaves either the old file or the whole new one (the
    rename itself must reach the disk too). The one way fastrsb writes files that matter: checkpoints,
    .beton files, shards, sidecars, manifests, exported weights. A stale .partial of a killed writer is
    replaced by the next attempt."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        write(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())
