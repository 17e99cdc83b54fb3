"""Checkpoints that survive a crash: `save_checkpoint(path, **states)` and `load_checkpoint(path)`.

    save_checkpoint("ckpt.pt", model=model.state_dict(), optimizer=opt.state_dict(),
                    system=system.state_dict(), step=step)
    states = load_checkpoint("ckpt.pt")
    model.load_state_dict(states["model"]); opt.load_state_dict(states["optimizer"])
    system.load_state_dict(states["system"])  # the model's state first (docs/system.md)

- Writing is atomic and durable: `torch.save` into a temporary file in the same directory, flush, `os.fsync`,
  `os.replace` over `path`, fsync of the directory (where the platform allows). A process killed at any
  moment leaves `path` as the previous checkpoint or the new one, never a torn one (a killed writer may leave
  its `.<name>.<random>.tmp` file behind; it is never read). A failed write raises `jsonl.FileWriteError`
  (an OSError naming the file) and leaves `path` as it was.
- The file is an ordinary `torch.save` zip archive of `{"chronomoe_checkpoint": 1, "states": {...}}` with a
  CRC-32 per record. Reading checks every record's CRC (so a flipped bit is found, not loaded as a wrong
  value), then `torch.load(weights_only=True)`. A truncated, corrupt or foreign file raises
  `CheckpointError` (a `jsonl.CorruptFileError`, hence a ValueError) naming the path; a missing or
  unreadable one raises the OSError of opening it.
- States hold what `torch.load(weights_only=True)` accepts: tensors, plain containers, numbers, strings
  (every `state_dict()` of this library, of torch modules and of torch optimizers).
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from .jsonl import CorruptFileError, replace_atomically

CHECKPOINT_FORMAT = 1
_FORMAT_KEY = "chronomoe_checkpoint"
PathLike = str | os.PathLike[str]
MapLocation = str | torch.device | dict[str, str] | None


class CheckpointError(CorruptFileError):
    """A checkpoint file that cannot be loaded: truncated, corrupt, not written by `save_checkpoint`, or holding
    objects `torch.load(weights_only=True)` refuses. The message names the path (also `.path`)."""


@contextlib.contextmanager
def _crc32_on() -> Iterator[None]:
    """torch.save with a CRC-32 per record, whatever the global option says (restored afterwards)."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    set_ = getattr(torch.serialization, "set_crc32_options", None)
    if get is None or set_ is None:  # older torch: CRCs are always computed
        yield
        return
    before = get()
    set_(True)
    try:
        yield
    finally:
        set_(before)


def save_checkpoint(path: PathLike, /, **states: Any) -> Path:
    """Write `states` (name -> state, e.g. `model=model.state_dict()`) to `path` atomically and durably (module
    docstring); the directory is created if needed. Returns the path. Raises ValueError without states,
    `FileWriteError` when the file cannot be written (the previous checkpoint stays), and what `torch.save`
    raises for an object it cannot serialise (nothing is written then)."""
    if not states:
        raise ValueError("save_checkpoint needs at least one state, e.g. save_checkpoint(path, model=...)")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    payload = {_FORMAT_KEY: CHECKPOINT_FORMAT, "states": dict(states)}

    def write(f: IO[bytes]) -> None:
        with _crc32_on():
            torch.save(payload, f)

    return replace_atomically(p, write)


def _verify_records(f: IO[bytes]) -> None:
    """Raise ValueError unless `f` is a complete zip archive whose every record matches its CRC-32."""
    with zipfile.ZipFile(f) as archive:
        names = archive.namelist()
        if not names:
            raise ValueError("the archive holds no record")
        bad = archive.testzip()
        if bad is not None:
            raise ValueError(f"record {bad!r} does not match its CRC-32")


def load_checkpoint(path: PathLike, *, map_location: MapLocation = None, verify: bool = True) -> dict[str, Any]:
    """The states `save_checkpoint` wrote to `path` (a dict name -> state).

    `map_location` is passed to `torch.load`; `verify=False` skips the CRC check of every record (one extra
    read of the file). Raises `CheckpointError` (a ValueError) naming the path when the file is truncated,
    corrupt, not a checkpoint of this format, or holds objects `torch.load(weights_only=True)` refuses; an
    OSError (e.g. FileNotFoundError) when it cannot be opened."""
    p = Path(path)
    with open(p, "rb") as f:
        try:
            if verify:
                _verify_records(f)
                f.seek(0)
            payload = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as err:  # whatever zipfile / torch.load raise, the file is unusable
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{p}: not a loadable checkpoint, truncated or corrupt ({type(err).__name__}: {reason[:200]})", p
            ) from err
    if not isinstance(payload, dict) or _FORMAT_KEY not in payload:
        raise CheckpointError(f"{p}: not a checkpoint written by save_checkpoint (no {_FORMAT_KEY!r} key)", p)
    if payload[_FORMAT_KEY] != CHECKPOINT_FORMAT or not isinstance(payload.get("states"), dict):
        raise CheckpointError(
            f"{p}: checkpoint format {payload[_FORMAT_KEY]!r} is unsupported: expected {CHECKPOINT_FORMAT}", p
        )
    states: dict[str, Any] = payload["states"]
    return states
