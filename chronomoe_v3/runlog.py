"""The run directory a `ChronoSystem` writes (`docs/run_report.md`): readings, control decisions, lineage,
token basins, beside the v2 telemetry files and the decision log, plus the flat scalar dict of a step.

Host side only (called from `step()`); appends are one flushed line each, whole files are replaced
atomically (`jsonl.py`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .jsonl import append_jsonl, write_json_atomic
from .telemetry import RoutingEvent, SystemSnapshot, TelemetryWriter
from .telemetry.io import MANIFEST_FILE

FORMAT = 1
READINGS_FILE = "readings.jsonl"
CONTROL_FILE = "control_decisions.jsonl"
LINEAGE_FILE = "lineage.json"
BASINS_FILE = "basins.json"
AUDITS_FILE = "audits.jsonl"
DECISIONS_FILE = "lifecycle_decisions.jsonl"
BASIN_TOP_TOKENS = 20

PER_EXPERT_METRICS = ("phi_fast", "phi_mid", "phi_slow", "share", "beta", "offset")
LAYER_METRICS = (
    "neff", "top2", "dead", "active", "psi_slow", "beta_absmax", "lens_scale", "alerts", "pressure", "starvation",
)


def finite_or_none(x: float) -> float | None:
    """A JSON-safe reading: None for NaN/Inf (unknown)."""
    x = float(x)
    return x if math.isfinite(x) else None


def layer_metrics(layer: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one layer's reading (`readings.jsonl` layer entry) under `chronomoe/L{l}/...` names;
    unknown values are left out."""
    lid = int(layer["layer_id"])
    active = [bool(a) for a in layer["active"]]
    betas = [abs(b) for b, a in zip(layer["beta"], active, strict=True) if a and b is not None]
    scalars: dict[str, float | None] = {
        "neff": layer.get("neff"), "top2": layer.get("top2"), "dead": layer.get("dead"),
        "active": float(sum(active)), "psi_slow": layer.get("psi_slow"),
        "beta_absmax": max(betas) if betas else 0.0, "lens_scale": layer.get("lens_scale"),
        "alerts": float(len(layer.get("alerts", []))), "pressure": layer.get("pressure"),
        "starvation": layer.get("starvation"),
    }
    out = {f"chronomoe/L{lid}/{k}": float(v) for k, v in scalars.items() if v is not None and math.isfinite(v)}
    for name in PER_EXPERT_METRICS:
        for slot, value in enumerate(layer[name]):
            if active[slot] and value is not None and math.isfinite(value):
                out[f"chronomoe/L{lid}/E{slot}/{name}"] = float(value)
    return out


def holds_no_records(run_dir: Path) -> bool:
    """True when `run_dir` does not exist or holds nothing but its manifest and empty files."""
    if not run_dir.is_dir():
        return True
    return all(p.name == MANIFEST_FILE or (p.is_file() and p.stat().st_size == 0) for p in run_dir.iterdir())


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """If `run_dir` already holds a run's records, rename it to the first free `<run_dir>.<n>` and return that
    path (None when there was nothing to set aside). A new run never appends to an old one's files;
    `ChronoSystem.load_state_dict` moves them back when it resumes that run."""
    if holds_no_records(run_dir):
        return None
    n = 1
    while (target := run_dir.with_name(f"{run_dir.name}.{n}")).exists():
        n += 1
    run_dir.rename(target)
    return target


class RunLog:
    """Writes one run's directory `<output_dir>/<run_id>/` (see `docs/run_report.md`)."""

    def __init__(self, output_dir: str | Path, run_id: str, metadata: Mapping[str, Any]) -> None:
        self.telemetry = TelemetryWriter(run_id, output_dir, metadata={"format": FORMAT, **dict(metadata)})
        self.run_dir = self.telemetry.run_dir
        files = {
            "routing_events": self.telemetry.events_path.name, "snapshots": self.telemetry.snapshots_path.name,
            "readings": READINGS_FILE, "decisions": DECISIONS_FILE, "control": CONTROL_FILE,
            "lineage": LINEAGE_FILE, "basins": BASINS_FILE, "audits": AUDITS_FILE,
        }
        self.telemetry.update_manifest(files=files)

    def path(self, name: str) -> Path:
        return self.run_dir / name

    def write_step(
        self,
        reading: Mapping[str, Any],
        snapshot: SystemSnapshot | None,
        events: Sequence[RoutingEvent],
        control: Iterable[Any],
    ) -> None:
        """One `step()`: its readings line, the v2 snapshot and events, and the controller's decisions."""
        append_jsonl(self.path(READINGS_FILE), [reading])
        if events:
            self.telemetry.write_events(events)
        if snapshot is not None:
            self.telemetry.write_snapshot(snapshot)
        rows = [c.to_dict() for c in control if callable(getattr(c, "to_dict", None))]
        if rows:
            append_jsonl(self.path(CONTROL_FILE), rows)

    def write_audit(self, record: Mapping[str, Any]) -> None:
        """One audited edit: predicted vs realised effect and the verdict (`lifecycle.audit.AuditRecord`)."""
        append_jsonl(self.path(AUDITS_FILE), [record])

    def write_lineage(self, step: int, experts: Iterable[Mapping[str, Any]]) -> None:
        keep = ("expert_id", "layer", "slot", "state", "born_step", "origin", "parent_id", "absorbed_ids",
                "ended_step", "ended_by", "successor_id")
        rows = [{k: e[k] for k in keep} for e in experts]
        write_json_atomic(self.path(LINEAGE_FILE), {"step": int(step), "experts": rows})

    def write_basins(
        self, step: int, vocabulary: Sequence[str] | None, experts: Mapping[str, Mapping[str, Any]]
    ) -> None:
        write_json_atomic(self.path(BASINS_FILE), {
            "step": int(step), "vocabulary": None if vocabulary is None else list(vocabulary),
            "experts": {k: dict(v) for k, v in experts.items()},
        })


def reading_record(
    step: int, call: int, loss: float | None, layers: Sequence[Mapping[str, Any]], metrics: Mapping[str, float]
) -> dict[str, Any]:
    """One `readings.jsonl` line."""
    return {
        "step": int(step), "call": int(call), "time": time.time(),
        "loss": None if loss is None else finite_or_none(loss), "layers": list(layers), "metrics": dict(metrics),
    }
