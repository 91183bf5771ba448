"""The one atomic file writer: a temp file beside the target, fsynced, then
renamed over it, so a reader sees the old file or the new one, never half
of one. Standard library only (the configs use it)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically (creating its directory)."""
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile("wb", dir=directory, delete=False,
                                   suffix=".tmp") as f:
    os.fchmod(f.fileno(), 0o644)  # a temp file starts at 0o600
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(f.name, path)


def write_text_atomic(path: str, text: str) -> None:
  write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str, obj: Any) -> None:
  """`obj` as indented JSON (keys sorted; non-JSON values as str)."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True,
                                     default=str) + "\n")
