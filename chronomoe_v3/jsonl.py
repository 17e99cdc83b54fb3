"""JSON-lines and JSON files that survive a crash: what telemetry, the decision log and the run directory share.

- Appends write one JSON object per line with one `write` each and flush it, so a crash tears at most the
  last line. `drop_torn_tail` (run when a file is reopened for appending) cuts such a torn line off, so
  that the next record starts on a fresh line.
- `load_jsonl` reads a file back strictly: a torn *last* line is dropped with a warning; an invalid line
  anywhere else is an error naming the file and line.
- `write_json_atomic` replaces a whole JSON file atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
PathLike = str | os.PathLike[str]


def drop_torn_tail(path: PathLike) -> int:
    """Truncate the bytes after the last newline of `path` (a line torn by a crash), warning when there are
    any; returns how many bytes were dropped (0 for a missing, empty or clean file)."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return 0
    data = p.read_bytes()
    if data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    warnings.warn(f"{p}: dropping a torn last line ({len(data) - keep} bytes)", stacklevel=3)
    with open(p, "r+b") as f:
        f.truncate(keep)
    return len(data) - keep


def append_jsonl(path: PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Append each record as one JSON line (one `write` + flush per line; NaN/Inf are refused)."""
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()


def load_jsonl(path: PathLike, parse: Callable[[Mapping[str, Any]], T]) -> list[T]:
    """`parse(record)` for every line of `path`; a torn last line is dropped with a warning, any other
    invalid line raises ValueError naming the file and line."""
    p = Path(path)
    lines = p.read_text(encoding="utf-8").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    out: list[T] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == len(lines):
                warnings.warn(f"{p}:{lineno}: dropping a torn last line ({err.msg})", stacklevel=3)
                break
            raise ValueError(f"{p}:{lineno}: not valid JSON ({err.msg}); only the last line may be torn") from err
        try:
            out.append(parse(record))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{p}:{lineno}: invalid record: {err}") from err
    return out


def write_json_atomic(path: PathLike, data: Any, *, indent: int | None = None, sort_keys: bool = False) -> None:
    """Replace `path` with `data` as JSON: written to a temporary file beside it, fsynced, then renamed, so a
    reader sees the old file or the new one, never a partial one."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
