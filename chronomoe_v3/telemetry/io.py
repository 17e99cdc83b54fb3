"""Telemetry files: ``<output_dir>/<run_id>/{routing_events.jsonl, snapshots.jsonl, run_manifest.json}``.

Lines are appended with unbuffered writes (``jsonl.append_jsonl``), so a crash can tear at most the last
line; the next append closes such a line with a newline. Loaders skip every unreadable line (torn, not UTF-8,
not JSON, nested too deeply, not a valid record) with a note and a warning and keep the rest; with
``strict=True`` an unreadable line other than a torn last one raises ``jsonl.CorruptFileError`` naming the
file and line. A manifest that cannot be read when a writer opens the run is set aside (renamed to
``run_manifest.json.unreadable-<n>``, warning) and a fresh one is written (docs/reliability.md).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..jsonl import CorruptFileError, append_jsonl, load_jsonl, read_json_file, terminate_last_line, write_json_atomic
from .events import RoutingEvent
from .snapshots import SystemSnapshot

EVENTS_FILE = "routing_events.jsonl"
SNAPSHOTS_FILE = "snapshots.jsonl"
MANIFEST_FILE = "run_manifest.json"
SCHEMA_VERSION = 1

PathLike = str | os.PathLike[str]


class TelemetryWriter:
    """Append routing events and snapshots of one run as JSON lines; keep a run manifest."""

    def __init__(self, run_id: str, output_dir: PathLike, metadata: Mapping[str, Any] | None = None) -> None:
        if not isinstance(run_id, str) or not run_id or os.sep in run_id or run_id in (".", ".."):
            raise ValueError(f"run_id must be a non-empty file name without '{os.sep}', got {run_id!r}")
        self.run_id = run_id
        self.run_dir = Path(output_dir) / run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.events_path = self.run_dir / EVENTS_FILE
        self.snapshots_path = self.run_dir / SNAPSHOTS_FILE
        self.manifest_path = self.run_dir / MANIFEST_FILE
        for path in (self.events_path, self.snapshots_path):
            terminate_last_line(path)
        manifest = self._read_manifest()
        manifest.setdefault("created", time.time())
        manifest.update(
            run_id=run_id,
            schema_version=SCHEMA_VERSION,
            files={"routing_events": EVENTS_FILE, "snapshots": SNAPSHOTS_FILE},
        )
        if metadata is not None:
            previous = manifest.get("metadata")
            manifest["metadata"] = {**(previous if isinstance(previous, dict) else {}), **dict(metadata)}
        self._write_manifest(manifest)

    def _read_manifest(self) -> dict[str, Any]:
        """The manifest on disk ({} when there is none). An unreadable one is renamed to the first free
        `run_manifest.json.unreadable-<n>` (warning; its bytes are kept for inspection) and {} returned."""
        if not self.manifest_path.exists():
            return {}
        try:
            return load_manifest(self.manifest_path)
        except CorruptFileError as err:
            n = 1
            while (aside := self.manifest_path.with_name(f"{MANIFEST_FILE}.unreadable-{n}")).exists():
                n += 1
            self.manifest_path.rename(aside)
            warnings.warn(f"{err}; moved it to {aside.name} and started a new manifest", stacklevel=3)
            return {}

    def _write_manifest(self, manifest: Mapping[str, Any]) -> None:
        write_json_atomic(self.manifest_path, manifest, indent=2, sort_keys=True)

    def write_event(self, event: RoutingEvent) -> None:
        append_jsonl(self.events_path, [event.to_dict()])

    def write_events(self, events: Iterable[RoutingEvent]) -> None:
        append_jsonl(self.events_path, (e.to_dict() for e in events))

    def write_snapshot(self, snapshot: SystemSnapshot) -> None:
        append_jsonl(self.snapshots_path, [snapshot.to_dict()])

    def update_manifest(self, **fields: Any) -> None:
        """Merge ``fields`` into the manifest (rewritten atomically)."""
        manifest = self._read_manifest()
        manifest.update(fields)
        self._write_manifest(manifest)


def _resolve(path: PathLike, default_name: str) -> Path:
    p = Path(path)
    return p / default_name if p.is_dir() else p


def load_routing_events(
    path: PathLike, *, strict: bool = False, skipped: list[str] | None = None
) -> list[RoutingEvent]:
    """RoutingEvents from a run directory or a ``routing_events.jsonl`` file; unreadable lines are skipped
    with a note in ``skipped`` and a warning (``strict=True``: raise ``CorruptFileError``; see the module
    docstring)."""
    return load_jsonl(_resolve(path, EVENTS_FILE), RoutingEvent.from_dict, strict=strict, skipped=skipped)


def load_snapshots(
    path: PathLike, *, strict: bool = False, skipped: list[str] | None = None
) -> list[SystemSnapshot]:
    """SystemSnapshots from a run directory or a ``snapshots.jsonl`` file; unreadable lines as in
    ``load_routing_events``."""
    return load_jsonl(_resolve(path, SNAPSHOTS_FILE), SystemSnapshot.from_dict, strict=strict, skipped=skipped)


def load_manifest(path: PathLike) -> dict[str, Any]:
    """The run manifest from a run directory or a ``run_manifest.json`` file. Raises ``CorruptFileError`` (a
    ValueError) naming the file when it is not UTF-8, not JSON, nested too deeply or not a JSON object;
    OSError (e.g. FileNotFoundError) propagates."""
    p = _resolve(path, MANIFEST_FILE)
    data = read_json_file(p)
    if not isinstance(data, dict):
        raise CorruptFileError(f"{p}: expected a JSON object, got {type(data).__name__}", p)
    return data
