"""Telemetry files: ``<output_dir>/<run_id>/{routing_events.jsonl, snapshots.jsonl, run_manifest.json}``.

Every line is written with one ``write`` and flushed, so a crash can tear at most the last line. Loaders
drop a torn (unparseable) last line with a warning; an unparseable line anywhere else is an error that
names the file and line number.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..jsonl import append_jsonl, drop_torn_tail, load_jsonl, write_json_atomic
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
            drop_torn_tail(path)
        manifest = load_manifest(self.manifest_path) if self.manifest_path.exists() else {}
        manifest.setdefault("created", time.time())
        manifest.update(
            run_id=run_id,
            schema_version=SCHEMA_VERSION,
            files={"routing_events": EVENTS_FILE, "snapshots": SNAPSHOTS_FILE},
        )
        if metadata is not None:
            manifest["metadata"] = {**manifest.get("metadata", {}), **dict(metadata)}
        self._write_manifest(manifest)

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
        manifest = load_manifest(self.manifest_path)
        manifest.update(fields)
        self._write_manifest(manifest)


def _resolve(path: PathLike, default_name: str) -> Path:
    p = Path(path)
    return p / default_name if p.is_dir() else p


def load_routing_events(path: PathLike) -> list[RoutingEvent]:
    """RoutingEvents from a run directory or a ``routing_events.jsonl`` file."""
    return load_jsonl(_resolve(path, EVENTS_FILE), RoutingEvent.from_dict)


def load_snapshots(path: PathLike) -> list[SystemSnapshot]:
    """SystemSnapshots from a run directory or a ``snapshots.jsonl`` file."""
    return load_jsonl(_resolve(path, SNAPSHOTS_FILE), SystemSnapshot.from_dict)


def load_manifest(path: PathLike) -> dict[str, Any]:
    """The run manifest from a run directory or a ``run_manifest.json`` file."""
    p = _resolve(path, MANIFEST_FILE)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err.msg})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object, got {type(data).__name__}")
    return data
