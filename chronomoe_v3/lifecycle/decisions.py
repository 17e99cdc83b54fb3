"""The decision log (SPEC 9): one JSON line per structural edit and per "do nothing" that beat a candidate.

Line format (schema: `docs/decision_log.schema.json`, JSON Schema draft 2020-12), keys in this order:
`{step, run_id, clock, action, layer_id, expert_id, child_id?, coherence_state{phi_fast, phi_mid, phi_slow,
beta, bimodality, evidence?}, free_energy{F_before, F_after_predicted, delta_F, components{misfit_delta,
complexity_delta, redundancy_delta, instability_delta}}, competing_edits[{action, expert_id, partner_id,
delta_F, reason}], trigger, reason?}`.

- `action`: an edit (prune, merge, split, spawn, replace), `rollback` (an audit found the edit of
  `expert_id` at an earlier step harmful and undid it) or do_nothing.
- `expert_id`: registry id (e.g. "L2_E5") of the expert acted on (pruned, split parent, merge: the absorbed
  one, replaced); null for spawn and do_nothing. `child_id` (only when present): the new expert (spawn,
  split, replace) or the merge survivor. Coherence readings are null where unknown (NaN is written as null);
  `evidence` is the tokens the readings rest on.
- The four components are the weighted terms of the predicted delta_F (they sum to it); a do_nothing
  record predicts F_after == F_before.

Lines are appended with unbuffered writes (in the OS once `append` returns), so a crash tears at most the
last line; reopening a log closes an unterminated last line with a newline (a complete record is kept, a
torn one stays a line of its own) and the loader skips, lists and warns about every unreadable line, keeping
the rest (shared with the telemetry files: `jsonl.py`, docs/reliability.md).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..jsonl import append_lines, load_jsonl, terminate_last_line

RECORD_ACTIONS = ("prune", "merge", "split", "spawn", "replace", "rollback", "do_nothing")
EDIT_ACTIONS = ("prune", "merge", "split", "spawn", "replace")
CLOCKS = ("fast", "mid", "slow")
PathLike = str | os.PathLike[str]
_TOLERANCE = 1e-6


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number")
    return float(value)


def _optional_number(name: str, value: Any) -> float | None:
    """None for None or NaN (unknown readings); a finite float otherwise."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return _finite(name, value)


def _optional_str(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name}={value!r} is invalid: expected a non-empty string or None")
    return value


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: expected one of {list(allowed)}")
    return str(value)


def _keys(name: str, data: Mapping[str, Any], required: Sequence[str], optional: Sequence[str] = ()) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{name} is {type(data).__name__}; expected a JSON object")
    missing = [k for k in required if k not in data]
    unknown = sorted(set(data) - set(required) - set(optional))
    if missing or unknown:
        raise ValueError(f"{name}: missing keys {missing}, unknown keys {unknown}; expected {list(required)}")


@dataclass(frozen=True)
class ExpertCoherence:
    """The acted-on expert's readings at decision time; None where unknown (e.g. spawn, do_nothing).
    `evidence`: the tokens routed to the expert over the slow window, what its readings rest on."""

    phi_fast: float | None = None
    phi_mid: float | None = None
    phi_slow: float | None = None
    beta: float | None = None
    bimodality: float | None = None
    evidence: float | None = None

    def __post_init__(self) -> None:
        for name in ("phi_fast", "phi_mid", "phi_slow", "beta", "bimodality", "evidence"):
            object.__setattr__(self, name, _optional_number(name, getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("phi_fast", "phi_mid", "phi_slow", "beta", "bimodality", "evidence")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpertCoherence:
        keys = ("phi_fast", "phi_mid", "phi_slow", "beta", "bimodality")
        _keys("coherence_state", data, keys, ("evidence",))
        return cls(**{k: data[k] for k in keys}, evidence=data.get("evidence"))


@dataclass(frozen=True)
class PredictedFreeEnergy:
    """F before, predicted F after, and the predicted delta with its four weighted components."""

    F_before: float
    F_after_predicted: float
    delta_F: float
    misfit_delta: float = 0.0
    complexity_delta: float = 0.0
    redundancy_delta: float = 0.0
    instability_delta: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "F_before", "F_after_predicted", "delta_F", "misfit_delta", "complexity_delta", "redundancy_delta",
            "instability_delta",
        ):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        parts = self.misfit_delta + self.complexity_delta + self.redundancy_delta + self.instability_delta
        scale = _TOLERANCE * max(1.0, abs(self.F_before), abs(self.delta_F))
        if abs(parts - self.delta_F) > scale:
            raise ValueError(f"components sum to {parts!r}; expected delta_F={self.delta_F!r}")
        if abs(self.F_before + self.delta_F - self.F_after_predicted) > scale:
            raise ValueError(
                f"F_after_predicted={self.F_after_predicted!r} is invalid: expected F_before + delta_F = "
                f"{self.F_before + self.delta_F!r}"
            )

    @classmethod
    def unchanged(cls, F_before: float) -> PredictedFreeEnergy:
        """The prediction of doing nothing."""
        return cls(F_before, F_before, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "F_before": self.F_before,
            "F_after_predicted": self.F_after_predicted,
            "delta_F": self.delta_F,
            "components": {
                "misfit_delta": self.misfit_delta,
                "complexity_delta": self.complexity_delta,
                "redundancy_delta": self.redundancy_delta,
                "instability_delta": self.instability_delta,
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PredictedFreeEnergy:
        _keys("free_energy", data, ("F_before", "F_after_predicted", "delta_F", "components"))
        comp = data["components"]
        names = ("misfit_delta", "complexity_delta", "redundancy_delta", "instability_delta")
        _keys("free_energy.components", comp, names)
        return cls(data["F_before"], data["F_after_predicted"], data["delta_F"], *(comp[k] for k in names))


@dataclass(frozen=True)
class CompetingEdit:
    """A candidate that was considered at the same review (edit or not taken)."""

    action: str
    expert_id: str | None
    delta_F: float
    reason: str = ""
    partner_id: str | None = None

    def __post_init__(self) -> None:
        _choice("competing_edits.action", self.action, EDIT_ACTIONS)
        _optional_str("competing_edits.expert_id", self.expert_id)
        _optional_str("competing_edits.partner_id", self.partner_id)
        object.__setattr__(self, "delta_F", _finite("competing_edits.delta_F", self.delta_F))
        if not isinstance(self.reason, str):
            raise ValueError(f"competing_edits.reason={self.reason!r} is invalid: expected a string")

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action, "expert_id": self.expert_id, "partner_id": self.partner_id,
            "delta_F": self.delta_F, "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompetingEdit:
        _keys("competing_edits[]", data, ("action", "expert_id", "partner_id", "delta_F", "reason"))
        return cls(data["action"], data["expert_id"], data["delta_F"], data["reason"], data["partner_id"])


@dataclass(frozen=True)
class DecisionRecord:
    """One line of the decision log (see the module docstring for the format)."""

    step: int
    run_id: str
    clock: str
    action: str
    layer_id: int
    expert_id: str | None
    coherence_state: ExpertCoherence
    free_energy: PredictedFreeEnergy
    trigger: str
    competing_edits: tuple[CompetingEdit, ...] = field(default_factory=tuple)
    child_id: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        for name in ("step", "layer_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 0")
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ValueError(f"run_id={self.run_id!r} is invalid: expected a non-empty string")
        _choice("clock", self.clock, CLOCKS)
        _choice("action", self.action, RECORD_ACTIONS)
        _optional_str("expert_id", self.expert_id)
        _optional_str("child_id", self.child_id)
        if not isinstance(self.trigger, str) or not self.trigger:
            raise ValueError(f"trigger={self.trigger!r} is invalid: expected a non-empty string")
        if self.reason is not None and not isinstance(self.reason, str):
            raise ValueError(f"reason={self.reason!r} is invalid: expected a string or None")
        if not isinstance(self.coherence_state, ExpertCoherence):
            raise ValueError(f"coherence_state is {type(self.coherence_state).__name__}; expected ExpertCoherence")
        if not isinstance(self.free_energy, PredictedFreeEnergy):
            raise ValueError(f"free_energy is {type(self.free_energy).__name__}; expected PredictedFreeEnergy")
        edits = tuple(self.competing_edits)
        for e in edits:
            if not isinstance(e, CompetingEdit):
                raise ValueError(f"competing_edits holds a {type(e).__name__}; expected CompetingEdit")
        object.__setattr__(self, "competing_edits", edits)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "step": self.step,
            "run_id": self.run_id,
            "clock": self.clock,
            "action": self.action,
            "layer_id": self.layer_id,
            "expert_id": self.expert_id,
        }
        if self.child_id is not None:
            out["child_id"] = self.child_id
        out["coherence_state"] = self.coherence_state.to_dict()
        out["free_energy"] = self.free_energy.to_dict()
        out["competing_edits"] = [e.to_dict() for e in self.competing_edits]
        out["trigger"] = self.trigger
        if self.reason is not None:
            out["reason"] = self.reason
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionRecord:
        required = (
            "step", "run_id", "clock", "action", "layer_id", "expert_id", "coherence_state", "free_energy",
            "competing_edits", "trigger",
        )
        _keys("decision record", data, required, ("child_id", "reason"))
        edits = data["competing_edits"]
        if not isinstance(edits, list):
            raise ValueError(f"competing_edits is {type(edits).__name__}; expected a list")
        return cls(
            step=data["step"],
            run_id=data["run_id"],
            clock=data["clock"],
            action=data["action"],
            layer_id=data["layer_id"],
            expert_id=data["expert_id"],
            coherence_state=ExpertCoherence.from_dict(data["coherence_state"]),
            free_energy=PredictedFreeEnergy.from_dict(data["free_energy"]),
            trigger=data["trigger"],
            competing_edits=tuple(CompetingEdit.from_dict(e) for e in edits),
            child_id=data.get("child_id"),
            reason=data.get("reason"),
        )


#: decision records a `DecisionLog` keeps in memory (the file keeps all of them)
MEMORY_RECORDS = 1000


class DecisionLog:
    """Decision records kept in memory and, when `path` is given, appended to a JSONL file.

    Each record is one line, appended with unbuffered writes (`jsonl.append_lines`; `fsync=True` also makes
    each line durable against a power loss, at the cost of one fsync per record). Opening an existing file
    closes an unterminated last line with a newline (warning) so that new lines start cleanly; nothing already
    in the file is removed.

    Memory and disk agree: a record joins `records` only once its line is in the file. A failed write raises
    `jsonl.FileWriteError` (an OSError naming the file) and leaves both `records` and the file as they were.

    Memory is bounded: `records` keeps the latest `max_records` records (default `MEMORY_RECORDS`; None = all),
    oldest dropped first; the file keeps every record (`load_decisions` reads them all back).
    """

    def __init__(
        self, path: PathLike | None = None, *, fsync: bool = False, max_records: int | None = None
    ) -> None:
        limit = MEMORY_RECORDS if max_records is None else max_records
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_records={max_records!r} is invalid: expected an integer >= 1 or None")
        self.path = None if path is None else Path(path)
        self.fsync = bool(fsync)
        self.max_records = limit
        self.records: list[DecisionRecord] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            terminate_last_line(self.path)
            self.path.touch()  # an empty log says "no decision yet"; a missing one says "not logged"

    def append(self, record: DecisionRecord) -> None:
        """Write `record`'s line (when the log has a file), then keep it in `records`. Raises ValueError for
        something other than a DecisionRecord and `FileWriteError` when the line cannot be written."""
        if not isinstance(record, DecisionRecord):
            raise ValueError(f"DecisionLog.append got {type(record).__name__}; expected a DecisionRecord")
        line = record.to_json()
        if self.path is not None:
            append_lines(self.path, [line], fsync=self.fsync)
        self.records.append(record)
        if len(self.records) > self.max_records:
            del self.records[: len(self.records) - self.max_records]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[DecisionRecord]:
        return iter(self.records)


def load_decisions(path: PathLike, *, strict: bool = False, skipped: list[str] | None = None) -> list[DecisionRecord]:
    """Records of a decision log file, in file order. An unreadable line (torn, not UTF-8, not JSON, nested too
    deeply, not a valid record) is skipped with a note in `skipped` (when given) and a warning; everything
    else is kept. With `strict=True` an unreadable line other than a torn last one raises
    `jsonl.CorruptFileError` (a ValueError) naming the file and line (`jsonl.load_jsonl`)."""
    return load_jsonl(Path(path), DecisionRecord.from_dict, strict=strict, skipped=skipped)
