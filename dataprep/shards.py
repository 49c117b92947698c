"""WebDataset-style tar shards with DALI index files, built in memory and written atomically."""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

from dataprep.files import atomic_write_bytes

TAR_BLOCK = 512


@dataclass
class ShardMember:
    key: str
    jpeg: bytes
    label: int


def build_shard(members: list[ShardMember]) -> tuple[bytes, bytes]:
    """Return (tar bytes, index bytes) for the members, in order.

    USTAR with short names keeps every header exactly one 512-byte block, so a member's
    data starts one block after its header: the offsets DALI's index needs.
    """
    buf = io.BytesIO()
    lines = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            parts = []
            for ext, payload in (("jpg", m.jpeg), ("cls", str(m.label).encode("ascii"))):
                info = tarfile.TarInfo(f"{m.key}.{ext}")
                info.size = len(payload)
                info.mode = 0o644
                header_at = buf.tell()
                tar.addfile(info, io.BytesIO(payload))
                parts.append(f"{ext} {header_at + TAR_BLOCK} {len(payload)} {m.key}.{ext}")
            lines.append(" ".join(parts))
    index = f"v1.2 {len(members)}\n" + "".join(ln + "\n" for ln in lines)
    return buf.getvalue(), index.encode()


def write_shard(tar_path: Path, idx_path: Path, members: list[ShardMember]) -> tuple[bytes, bytes]:
    tar_bytes, idx_bytes = build_shard(members)
    atomic_write_bytes(tar_path, tar_bytes)
    atomic_write_bytes(idx_path, idx_bytes)
    return tar_bytes, idx_bytes
