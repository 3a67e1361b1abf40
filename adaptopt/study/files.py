"""Atomic file writes: runners sharing a study folder may write the same report files at the same moment."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: str | bytes) -> Path:
    """Writes ``path`` through a temporary file of this process renamed over it, so a reader (or another
    process writing the same file at the same time) only ever sees a whole file: one writer's, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    tmp.replace(path)
    return path
