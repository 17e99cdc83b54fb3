"""JSON-lines and JSON files that survive a crash: what telemetry, the decision log and the run directory share.

Writing (docs/reliability.md, "Files, logs and checkpoints"):
- `append_jsonl` writes one JSON object per line. All lines of one call are serialised before anything is
  written (a record that cannot be written as JSON leaves the file untouched), then written with unbuffered
  `os.write` calls (handed to the OS before the call returns, so a killed process loses nothing already
  appended; `fsync=True` also survives a power loss). A crash tears at most the last line.
- Before appending, a file whose last line has no newline gets one (`terminate_last_line`): a complete record
  written without its newline stays intact, a torn partial record stays a line of its own that readers skip.
  Nothing already on disk is ever cut off.
- A failed append raises `FileWriteError` (an OSError naming the file) after cutting the file back to its
  size before the call, so the call either wrote all its lines or none (when even the cut fails, the torn
  line is terminated by the next append and skipped by readers).
- `write_json_atomic` replaces a whole JSON file atomically: a temporary file in the same directory, flushed
  and fsynced, `os.replace`d over the target, then the directory fsynced (where the platform allows).

Reading:
- Each line is decoded and parsed on its own (`parse_json_bytes`): bytes that are not UTF-8, text that is not
  JSON or JSON nested deeper than `MAX_DEPTH` levels (checked before parsing, so no RecursionError) make
  that line unreadable, never the file. `load_jsonl` skips such lines, lists them in `skipped` and warns;
  with `strict=True` any unreadable line other than a torn last one raises `CorruptFileError`.
- `read_json_file` reads a whole JSON file; an unreadable one raises `CorruptFileError` naming the path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
PathLike = str | os.PathLike[str]

MAX_DEPTH = 128
"""Deepest nesting of JSON arrays/objects a reader accepts (the library's own records nest 5 levels)."""

MAX_NOTES_IN_WARNING = 5
_CHUNK = 1 << 16
_BINARY = getattr(os, "O_BINARY", 0)
# A JSON string, or an unterminated one running to the end of the text. Linear: no backtracking.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
_OPEN = (ord("["), ord("{"))
_CLOSE = (ord("]"), ord("}"))


class CorruptFileError(ValueError):
    """A file (or a line of it) that cannot be read back: truncated, not UTF-8, not JSON, nested too deeply or
    not in the expected format. `path` is the file, `line` the 1-based line number where one applies."""

    def __init__(self, message: str, path: PathLike, line: int | None = None) -> None:
        super().__init__(message)
        self.path = Path(path)
        self.line = line


class FileWriteError(OSError):
    """Writing a log line or replacing a file failed; the message names the file and what was kept.
    `errno` / `strerror` are those of the underlying OSError, `filename` the file."""


def _write_error(path: Path, what: str, err: OSError) -> FileWriteError:
    reason = err.strerror or str(err) or type(err).__name__
    return FileWriteError(err.errno or 0, f"{what} {path} failed ({reason})", str(path))


# ---------------------------------------------------------------------------------------------------------
# parsing


def nesting_depth(text: str) -> int:
    """The deepest nesting of `[`/`{` in `text` outside JSON strings (linear time, no recursion; brackets of
    malformed text are counted as they come, which can only overstate the depth)."""
    if text.count("[") + text.count("{") == 0:
        return 0
    outside = _STRING.sub("", text).encode("utf-8", "surrogatepass")
    codes = np.frombuffer(outside, dtype=np.uint8)
    steps = np.zeros(codes.shape, dtype=np.int64)
    steps[np.isin(codes, _OPEN)] = 1
    steps[np.isin(codes, _CLOSE)] = -1
    return int(np.cumsum(steps).max(initial=0))


def parse_json_text(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads(text)` that refuses nesting deeper than `max_depth` before parsing. Raises ValueError (a
    json.JSONDecodeError when the text is not JSON; "nested too deeply" past `max_depth`)."""
    if nesting_depth(text) > max_depth:
        raise ValueError("nested too deeply")
    try:
        return json.loads(text)
    except RecursionError:  # not reached below max_depth; kept so that no RecursionError ever escapes
        raise ValueError("nested too deeply") from None


def parse_json_bytes(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in `raw` (UTF-8). Raises ValueError saying why when it is not UTF-8 (naming the first bad
    byte), not JSON, or nested deeper than `max_depth`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})") from None
    return parse_json_text(text, max_depth)


def describe_error(err: BaseException) -> str:
    """A short reason for a parse failure of `parse_json_bytes` / `parse_json_text`."""
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno})"
    if isinstance(err, RecursionError):
        return "not valid JSON (nested too deeply)"
    text = str(err) or type(err).__name__
    return text if text.startswith("not UTF-8") else f"not valid JSON ({text})"


# ---------------------------------------------------------------------------------------------------------
# appending


def _open_append(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _BINARY, 0o666)
    except OSError as err:
        raise _write_error(path, "opening", err) from err


def _last_line(fd: int, size: int) -> bytes:
    """The bytes after the last newline of the open file (read backwards in chunks)."""
    parts: list[bytes] = []
    end = size
    while end > 0:
        start = max(0, end - _CHUNK)
        os.lseek(fd, start, os.SEEK_SET)
        chunk = os.read(fd, end - start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            parts.append(chunk[cut + 1 :])
            break
        parts.append(chunk)
        end = start
    return b"".join(reversed(parts))


def _needs_newline(fd: int, path: Path) -> bool:
    """True (with a warning) when the open file is non-empty and its last byte is not a newline."""
    size = os.fstat(fd).st_size
    if size == 0:
        return False
    os.lseek(fd, size - 1, os.SEEK_SET)
    if os.read(fd, 1) == b"\n":
        return False
    tail = _last_line(fd, size)
    try:
        parse_json_bytes(tail)
        complete = True
    except ValueError:
        complete = False
    if complete:
        warnings.warn(f"{path}: the last record had no newline; added one (the record is kept)", stacklevel=4)
    else:
        warnings.warn(
            f"{path}: a torn last line ({len(tail)} bytes) was closed with a newline; readers skip it", stacklevel=4
        )
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def append_lines(path: PathLike, lines: Iterable[str], *, fsync: bool = False) -> None:
    """Append `lines` (each one JSON text without a newline) to `path`, all or nothing (module docstring).

    A file whose last line lacks its newline gets one first. Raises `FileWriteError` naming the file when the
    write fails; the file is then cut back to its size before the call."""
    p = Path(path)
    data = b"".join(line.encode("utf-8") + b"\n" for line in lines)
    if not data:
        return
    fd = _open_append(p)
    try:
        size = os.fstat(fd).st_size
        try:
            if _needs_newline(fd, p):
                data = b"\n" + data
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise _write_error(p, "appending to", err) from err
    finally:
        os.close(fd)


def append_jsonl(path: PathLike, records: Iterable[Mapping[str, Any]], *, fsync: bool = False) -> None:
    """Append each record as one JSON line (NaN/Inf are refused with ValueError before anything is written);
    all lines or none (see `append_lines`)."""
    append_lines(path, [json.dumps(record, allow_nan=False) for record in records], fsync=fsync)


def terminate_last_line(path: PathLike) -> bool:
    """Give `path` a final newline when its last line lacks one (warning), so that the next record starts on a
    fresh line; nothing is removed. Returns whether a newline was added (False for a missing or clean file)."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return False
    fd = _open_append(p)
    try:
        if not _needs_newline(fd, p):
            return False
        try:
            _write_all(fd, b"\n")
        except OSError as err:
            raise _write_error(p, "terminating the last line of", err) from err
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# reading


def load_jsonl(
    path: PathLike,
    parse: Callable[[Mapping[str, Any]], T],
    *,
    strict: bool = False,
    skipped: list[str] | None = None,
) -> list[T]:
    """`parse(record)` for every readable line of `path` (each line a JSON object), in file order.

    A line that is not UTF-8, not JSON, nested too deeply, not an object or refused by `parse` (ValueError,
    TypeError, KeyError, ...) is skipped: a note `"<path>:<line>: why"` is appended to `skipped` (when given)
    and one UserWarning lists the notes. Everything before and after it is kept. With `strict=True` such a line
    raises `CorruptFileError` instead, except an unterminated last line (torn by a crash), which is always
    skipped. OSError (e.g. FileNotFoundError) propagates."""
    p = Path(path)
    raw_lines = p.read_bytes().split(b"\n")
    notes: list[str] = []
    out: list[T] = []
    last = len(raw_lines) - 1  # the bytes after the final newline (b"" for a clean file)
    for index, raw in enumerate(raw_lines):
        if not raw.strip():
            continue
        lineno = index + 1
        try:
            record = parse_json_bytes(raw)
        except ValueError as err:
            why = describe_error(err)
            if index == last:
                notes.append(f"{p}:{lineno}: torn last line ({why})")
                continue
            if strict:
                raise CorruptFileError(f"{p}:{lineno}: {why}", p, lineno) from None
            notes.append(f"{p}:{lineno}: {why}")
            continue
        try:
            if not isinstance(record, dict):
                raise ValueError(f"the line holds a JSON {type(record).__name__}; expected an object")
            out.append(parse(record))
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, ArithmeticError, RecursionError) as err:
            message = f"{p}:{lineno}: invalid record: {err}"
            if strict:
                raise CorruptFileError(message, p, lineno) from err
            notes.append(message)
    if notes:
        if skipped is not None:
            skipped.extend(notes)
        more = f"; and {len(notes) - MAX_NOTES_IN_WARNING} more" if len(notes) > MAX_NOTES_IN_WARNING else ""
        warnings.warn(
            f"skipped {len(notes)} unreadable line(s): " + "; ".join(notes[:MAX_NOTES_IN_WARNING]) + more,
            stacklevel=3,
        )
    return out


def read_json_file(path: PathLike) -> Any:
    """The JSON value of a whole file. Raises `CorruptFileError` naming the path when it is not UTF-8, not JSON
    or nested too deeply; OSError (e.g. FileNotFoundError) propagates."""
    p = Path(path)
    try:
        return parse_json_bytes(p.read_bytes())
    except ValueError as err:
        raise CorruptFileError(f"{p}: {describe_error(err)}", p) from None


# ---------------------------------------------------------------------------------------------------------
# whole files


def fsync_directory(directory: PathLike) -> None:
    """fsync a directory so that a rename inside it is durable; a no-op where directories cannot be opened
    (e.g. Windows)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def _create_temporary(p: Path) -> tuple[int, Path]:
    """A new file `.<name>.<random>.tmp` beside `p`, opened for writing (mode 0666 less the umask, like a file
    created plainly)."""
    while True:
        tmp = p.with_name(f".{p.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as err:
            raise _write_error(p, "creating a temporary file to replace", err) from err


def replace_atomically(path: PathLike, write: Callable[[Any], None]) -> Path:
    """Replace `path` with what `write(file)` writes to a binary file object: a temporary file beside it
    (`.<name>.<random>.tmp`), flushed and fsynced, `os.replace`d over `path`, then the directory fsynced. A
    reader sees the old file or the new one, never a partial one. On any error the temporary file is removed
    and `path` is untouched; an OSError is raised as `FileWriteError` naming `path`. (A process killed while
    writing leaves its temporary file behind; `path` is still the old file.)"""
    p = Path(path)
    fd, tmp = _create_temporary(p)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and not isinstance(err, FileWriteError):
            raise _write_error(p, "replacing", err) from err
        raise
    fsync_directory(p.parent)
    return p


def write_json_atomic(path: PathLike, data: Any, *, indent: int | None = None, sort_keys: bool = False) -> None:
    """Replace `path` with `data` as JSON, atomically and durably (`replace_atomically`). Data that cannot be
    written as JSON (NaN, Inf, other types) raises ValueError/TypeError before anything is written."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"
    encoded = text.encode("utf-8")
    replace_atomically(path, lambda f: f.write(encoded))
