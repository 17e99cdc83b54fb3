"""Tolerant loaders for a run directory (`docs/run_report.md`, format 1) and a benchmark `outcomes.json`.

Nothing here raises on bad content: every file that is missing or unreadable, every line that is torn,
not UTF-8, not JSON, or not in the format, is skipped and described in a human-readable note
(`"readings.jsonl line 7: ..."`) collected in `skipped`. Only an input path that does not exist (or an
outcomes file that cannot be read at all) raises `ReportInputError`.

Choices where the spec leaves room:
- A readings line is checked per layer: a bad layer entry drops that layer of that line only. Of a layer's
  keys only `layer_id` and `expert_ids` are required; the other keys of the spec may be absent (then unknown)
  but, when present, must have the right type and one entry per slot. Keys the spec does not name are ignored.
- The slot count of a layer is the manifest's `num_slots`; for a layer the manifest does not list (or without
  a manifest) it is the length of `expert_ids` in the first readings line that has the layer.
- NaN readings (which Python's json accepts) are treated as unknown, like null.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..governance.controller import ControlDecision
from ..jsonl import describe_error, parse_json_bytes
from ..lifecycle.decisions import DecisionRecord
from ..ops.registry import ENDINGS as REGISTRY_ENDINGS
from ..ops.registry import ORIGINS as REGISTRY_ORIGINS

MANIFEST_FILE = "run_manifest.json"
READINGS_FILE = "readings.jsonl"
DECISIONS_FILE = "lifecycle_decisions.jsonl"
CONTROL_FILE = "control_decisions.jsonl"
AUDITS_FILE = "audits.jsonl"
LINEAGE_FILE = "lineage.json"
BASINS_FILE = "basins.json"

SLOT_NUMBER_KEYS = ("phi_fast", "phi_mid", "phi_slow", "beta", "offset", "share", "share_slow", "bimodality")
SLOT_BOOL_KEYS = ("active", "degrading")
LAYER_NUMBER_KEYS = ("neff", "top2", "dead", "psi_slow", "lens_scale")
EXPERT_STATES = ("cooling", "active", "archived")
ORIGINS = REGISTRY_ORIGINS  # what the registry writes, one source
END_KINDS = REGISTRY_ENDINGS


class ReportInputError(ValueError):
    """The input of a report or comparison cannot be used at all (e.g. the run directory does not exist)."""


class _Bad(ValueError):
    """A value that does not match the format; the message says which value and what was expected."""


# ---------------------------------------------------------------------------------------------------------
# data classes


@dataclass
class LayerInfo:
    """One MoE layer as the manifest describes it (fields other than the id and slot count may be None)."""

    layer_id: int
    num_slots: int
    name: str | None = None
    top_k: int | None = None
    hidden_size: int | None = None


@dataclass
class LayerReading:
    """One layer's readings at one `step()` call; per-slot lists have one entry per slot, None = unknown."""

    layer_id: int
    expert_ids: list[str | None]
    slots: dict[str, list[float | None]]
    active: list[bool | None]
    degrading: list[bool | None]
    scalars: dict[str, float | None]
    alerts: list[str]


@dataclass
class Reading:
    """One line of `readings.jsonl`: the step, call, time, loss, the layers by id, and the flat metrics."""

    step: int
    call: int | None
    time: float | None
    loss: float | None
    layers: dict[int, LayerReading]
    metrics: dict[str, float]
    line: int


@dataclass
class ExpertLife:
    """One expert's record of `lineage.json`."""

    expert_id: str
    layer: int
    slot: int
    born_step: int
    state: str | None = None
    origin: str | None = None
    parent_id: str | None = None
    absorbed_ids: list[str] = field(default_factory=list)
    ended_step: int | None = None
    ended_by: str | None = None
    successor_id: str | None = None


@dataclass
class Basin:
    """One live expert's entry of `basins.json`: its most attracted `(token id, count)` pairs, most first."""

    expert_id: str
    layer: int
    slot: int
    total: float
    tokens: list[tuple[int, float]]


@dataclass
class RunData:
    """Everything readable in a run directory, and a note for everything that was not.

    `manifest` is the raw manifest dict (None when missing or unreadable); `layers` the manifest's layers by
    id; `readings` the parsed `readings.jsonl` lines; `decisions` the `lifecycle_decisions.jsonl` records;
    `control` the `control_decisions.jsonl` dicts; `lineage` the experts of `lineage.json` in file order;
    `basins` / `vocabulary` the content of `basins.json`; `skipped` one note per thing left out.
    """

    run_dir: Path
    manifest: dict[str, Any] | None = None
    layers: dict[int, LayerInfo] = field(default_factory=dict)
    readings: list[Reading] = field(default_factory=list)
    decisions: list[DecisionRecord] = field(default_factory=list)
    control: list[dict[str, Any]] = field(default_factory=list)
    lineage: list[ExpertLife] = field(default_factory=list)
    lineage_step: int | None = None
    basins: list[Basin] = field(default_factory=list)
    basins_step: int | None = None
    audits: list[dict[str, Any]] = field(default_factory=list)
    vocabulary: list[str] | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        """The manifest's run id, else the decision log's, else the run directory's name."""
        if self.manifest is not None and isinstance(self.manifest.get("run_id"), str) and self.manifest["run_id"]:
            return str(self.manifest["run_id"])
        if self.decisions:
            return self.decisions[0].run_id
        for record in self.control:
            if isinstance(record.get("run_id"), str) and record["run_id"]:
                return str(record["run_id"])
        return self.run_dir.name

    @property
    def metadata(self) -> dict[str, Any]:
        """The manifest's `metadata` dict ({} when absent)."""
        meta = None if self.manifest is None else self.manifest.get("metadata")
        return meta if isinstance(meta, dict) else {}

    def layer_ids(self) -> list[int]:
        """Every layer id seen in the manifest or the readings, sorted."""
        ids = set(self.layers)
        for reading in self.readings:
            ids.update(reading.layers)
        return sorted(ids)

    def last_step(self) -> int | None:
        """The largest step seen in any file (None when nothing has a step)."""
        steps = [r.step for r in self.readings] + [d.step for d in self.decisions]
        steps += [s for s in (self.lineage_step, self.basins_step) if s is not None]
        for life in self.lineage:
            steps.append(life.born_step)
            if life.ended_step is not None:
                steps.append(life.ended_step)
        return max(steps) if steps else None


# ---------------------------------------------------------------------------------------------------------
# value checks (raise _Bad naming the value and what was expected)


def _int(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _Bad(f"{what}={_short(value)} is invalid: expected an integer >= {minimum}")
    return value


def _opt_int(value: Any, what: str, minimum: int = 0) -> int | None:
    return None if value is None else _int(value, what, minimum)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad(f"{what}={_short(value)} is invalid: expected a finite number")
    return float(value)


def _opt_number(value: Any, what: str) -> float | None:
    """None for null or NaN (unknown); a finite float otherwise."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return _number(value, what)


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Bad(f"{what}={_short(value)} is invalid: expected a non-empty string")
    return value


def _opt_str(value: Any, what: str) -> str | None:
    return None if value is None else _str(value, what)


def _choice(value: Any, what: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _Bad(f"{what}={_short(value)} is invalid: expected one of {', '.join(allowed)}")
    return str(value)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{what} is {_kind(value)}; expected a JSON object")
    return value


def _list(value: Any, what: str, length: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad(f"{what} is {_kind(value)}; expected a list")
    if length is not None and len(value) != length:
        raise _Bad(f"{what} has {len(value)} entries; expected {length} (the layer's slot count)")
    return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------
# reading files


def _read_bytes(path: Path, skipped: list[str], missing_note: str = "missing") -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        skipped.append(f"{path.name}: {missing_note}")
    except IsADirectoryError:
        skipped.append(f"{path.name}: is a directory, expected a file")
    except OSError as err:
        skipped.append(f"{path.name}: unreadable ({err.strerror or err})")
    return None


def _json_lines(path: Path, skipped: list[str], missing_note: str = "missing") -> Iterator[tuple[int, Any]]:
    """`(line number, parsed JSON value)` for each readable line of a JSONL file; a note for every other line.
    Each line is decoded and parsed on its own (`jsonl.parse_json_bytes`: depth-limited, never a
    RecursionError), so one bad line never hides the lines around it."""
    data = _read_bytes(path, skipped, missing_note)
    if data is None:
        return
    lines = data.split(b"\n")
    for index, raw in enumerate(lines):
        lineno = index + 1
        if not raw.strip():
            continue
        unterminated = index == len(lines) - 1  # no newline after it: a crash may have torn it
        try:
            value = parse_json_bytes(raw)
        except ValueError as err:
            why = describe_error(err)
            if unterminated:
                skipped.append(f"{path.name} line {lineno}: torn last line (no newline; {why})")
            else:
                skipped.append(f"{path.name} line {lineno}: {why}")
            continue
        yield lineno, value


def _json_file(path: Path, skipped: list[str], missing_note: str = "missing") -> dict[str, Any] | None:
    """The JSON object in `path`, or None with a note when it is missing, unreadable or not an object."""
    data = _read_bytes(path, skipped, missing_note)
    if data is None:
        return None
    try:
        value = parse_json_bytes(data)
    except ValueError as err:
        skipped.append(f"{path.name}: {describe_error(err)}")
        return None
    if not isinstance(value, dict):
        skipped.append(f"{path.name}: the file holds {_kind(value)}; expected a JSON object")
        return None
    return value


# ---------------------------------------------------------------------------------------------------------
# parsers of one record


def _parse_layer_info(data: Any, what: str) -> LayerInfo:
    entry = _object(data, what)
    for key in ("layer_id", "num_slots"):
        if key not in entry:
            raise _Bad(f"{what}: missing key {key!r}")
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise _Bad(f"{what}.name={_short(name)} is invalid: expected a string")
    return LayerInfo(
        layer_id=_int(entry["layer_id"], f"{what}.layer_id"),
        num_slots=_int(entry["num_slots"], f"{what}.num_slots", 1),
        name=name,
        top_k=_opt_int(entry.get("top_k"), f"{what}.top_k", 1),
        hidden_size=_opt_int(entry.get("hidden_size"), f"{what}.hidden_size", 1),
    )


def _parse_layer_reading(data: Any, slot_counts: dict[int, int]) -> LayerReading:
    entry = _object(data, "the layer entry")
    for key in ("layer_id", "expert_ids"):
        if key not in entry:
            raise _Bad(f"missing key {key!r}")
    layer_id = _int(entry["layer_id"], "layer_id")
    raw_ids = _list(entry["expert_ids"], "expert_ids", slot_counts.get(layer_id))
    if not raw_ids:
        raise _Bad("expert_ids is empty; expected one entry per slot")
    n = len(raw_ids)
    expert_ids = [_opt_str(v, f"expert_ids[{e}]") for e, v in enumerate(raw_ids)]
    slots: dict[str, list[float | None]] = {}
    for key in SLOT_NUMBER_KEYS:
        values = _list(entry.get(key, [None] * n), key, n)
        slots[key] = [_opt_number(v, f"{key}[{e}]") for e, v in enumerate(values)]
    flags: dict[str, list[bool | None]] = {}
    for key in SLOT_BOOL_KEYS:
        values = _list(entry.get(key, [None] * n), key, n)
        for e, v in enumerate(values):
            if v is not None and not isinstance(v, bool):
                raise _Bad(f"{key}[{e}]={_short(v)} is invalid: expected true, false or null")
        flags[key] = list(values)
    scalars = {key: _opt_number(entry.get(key), key) for key in LAYER_NUMBER_KEYS}
    alerts = _list(entry.get("alerts", []), "alerts")
    for i, alert in enumerate(alerts):
        _str(alert, f"alerts[{i}]")
    slot_counts.setdefault(layer_id, n)
    return LayerReading(layer_id, expert_ids, slots, flags["active"], flags["degrading"], scalars, list(alerts))


def _parse_reading(value: Any, lineno: int, slot_counts: dict[int, int], notes: list[str]) -> Reading:
    """One readings line; bad layer entries and bad metrics are left out with a note, the rest is kept."""
    record = _object(value, "the line")
    if "step" not in record:
        raise _Bad("missing key 'step'")
    step = _int(record["step"], "step")
    call = _opt_int(record.get("call"), "call", 1)
    time_ = _opt_number(record.get("time"), "time")
    loss = _opt_number(record.get("loss"), "loss")
    layers_raw = _list(record.get("layers", []), "layers")
    layers: dict[int, LayerReading] = {}
    for i, entry in enumerate(layers_raw):
        label = f"layers[{i}]"
        if isinstance(entry, dict) and isinstance(entry.get("layer_id"), int):
            label += f" (layer {entry['layer_id']})"
        try:
            layer = _parse_layer_reading(entry, slot_counts)
        except _Bad as err:
            notes.append(f"{READINGS_FILE} line {lineno}, {label}: {err}")
            continue
        if layer.layer_id in layers:
            notes.append(f"{READINGS_FILE} line {lineno}, {label}: layer {layer.layer_id} repeated; kept the first")
            continue
        layers[layer.layer_id] = layer
    metrics: dict[str, float] = {}
    raw_metrics = record.get("metrics", {})
    if isinstance(raw_metrics, dict) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw_metrics.values()
    ):
        metrics = {str(k): float(v) for k, v in raw_metrics.items()}
    else:
        notes.append(f"{READINGS_FILE} line {lineno}: metrics left out (expected an object of numbers)")
    return Reading(step, call, time_, loss, layers, metrics, lineno)


def _parse_control(value: Any) -> dict[str, Any]:
    record = _object(value, "the line")
    _int(record.get("step"), "step")
    _int(record.get("layer_id"), "layer_id")
    for key in ("observed", "computed", "actuator"):
        _object(record.get(key), key)
    if not isinstance(record.get("emergency", False), bool):
        raise _Bad(f"emergency={_short(record.get('emergency'))} is invalid: expected true or false")
    try:
        ControlDecision.from_dict(record)
    except TypeError as err:
        raise _Bad(f"keys do not match ControlDecision ({err})") from None
    return record


def _parse_life(data: Any, slot_counts: dict[int, int]) -> ExpertLife:
    entry = _object(data, "the entry")
    for key in ("expert_id", "layer", "slot", "born_step"):
        if key not in entry:
            raise _Bad(f"missing key {key!r}")
    layer = _int(entry["layer"], "layer")
    slot = _int(entry["slot"], "slot")
    if layer in slot_counts and slot >= slot_counts[layer]:
        raise _Bad(f"slot={slot} is invalid: expected < {slot_counts[layer]} (the layer's slot count)")
    state = entry.get("state")
    origin = entry.get("origin")
    ended_by = entry.get("ended_by")
    absorbed = _list(entry.get("absorbed_ids", []), "absorbed_ids")
    born = _int(entry["born_step"], "born_step")
    ended = _opt_int(entry.get("ended_step"), "ended_step")
    if ended is not None and ended < born:
        raise _Bad(f"ended_step={ended} is invalid: expected >= born_step={born}")
    return ExpertLife(
        expert_id=_str(entry["expert_id"], "expert_id"),
        layer=layer,
        slot=slot,
        born_step=born,
        state=None if state is None else _choice(state, "state", EXPERT_STATES),
        origin=None if origin is None else _choice(origin, "origin", ORIGINS),
        parent_id=_opt_str(entry.get("parent_id"), "parent_id"),
        absorbed_ids=[_str(a, f"absorbed_ids[{i}]") for i, a in enumerate(absorbed)],
        ended_step=ended,
        ended_by=None if ended_by is None else _choice(ended_by, "ended_by", END_KINDS),
        successor_id=_opt_str(entry.get("successor_id"), "successor_id"),
    )


def _parse_basin(expert_id: Any, data: Any) -> Basin:
    entry = _object(data, "the entry")
    for key in ("layer", "slot", "tokens"):
        if key not in entry:
            raise _Bad(f"missing key {key!r}")
    tokens: list[tuple[int, float]] = []
    for i, pair in enumerate(_list(entry["tokens"], "tokens")):
        if not isinstance(pair, list) or len(pair) != 2:
            raise _Bad(f"tokens[{i}]={_short(pair)} is invalid: expected a [token id, count] pair")
        tokens.append((_int(pair[0], f"tokens[{i}][0]"), _number(pair[1], f"tokens[{i}][1]")))
    total = entry.get("total")
    return Basin(
        expert_id=_str(expert_id, "expert id"),
        layer=_int(entry["layer"], "layer"),
        slot=_int(entry["slot"], "slot"),
        total=sum(c for _, c in tokens) if total is None else _number(total, "total"),
        tokens=tokens,
    )


# ---------------------------------------------------------------------------------------------------------
# the run directory


def _load_manifest(run: RunData) -> None:
    manifest = _json_file(run.run_dir / MANIFEST_FILE, run.skipped)
    if manifest is None:
        return
    run.manifest = manifest
    meta = manifest.get("metadata")
    if meta is None:
        run.skipped.append(f"{MANIFEST_FILE}: no 'metadata' (the layers are taken from the readings)")
        return
    if not isinstance(meta, dict):
        run.skipped.append(f"{MANIFEST_FILE}: 'metadata' is {_kind(meta)}; expected a JSON object")
        return
    if meta.get("format", 1) != 1:
        run.skipped.append(f"{MANIFEST_FILE}: format={_short(meta.get('format'))}; expected 1 (read as format 1)")
    layers = meta.get("layers", [])
    if not isinstance(layers, list):
        run.skipped.append(f"{MANIFEST_FILE}: metadata.layers is {_kind(layers)}; expected a list")
        return
    for i, entry in enumerate(layers):
        try:
            info = _parse_layer_info(entry, f"metadata.layers[{i}]")
        except _Bad as err:
            run.skipped.append(f"{MANIFEST_FILE}: {err}")
            continue
        if info.layer_id in run.layers:
            run.skipped.append(f"{MANIFEST_FILE}: metadata.layers[{i}] repeats layer {info.layer_id}; kept the first")
            continue
        run.layers[info.layer_id] = info


def _load_readings(run: RunData, slot_counts: dict[int, int]) -> None:
    for lineno, value in _json_lines(run.run_dir / READINGS_FILE, run.skipped):
        try:
            run.readings.append(_parse_reading(value, lineno, slot_counts, run.skipped))
        except _Bad as err:
            run.skipped.append(f"{READINGS_FILE} line {lineno}: {err}")


def _load_decisions(run: RunData) -> None:
    for lineno, value in _json_lines(run.run_dir / DECISIONS_FILE, run.skipped):
        try:
            run.decisions.append(DecisionRecord.from_dict(_object(value, "the line")))
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            run.skipped.append(f"{DECISIONS_FILE} line {lineno}: {err}")


def _load_control(run: RunData) -> None:
    note = "missing (written only when the system has a controller)"
    for lineno, value in _json_lines(run.run_dir / CONTROL_FILE, run.skipped, note):
        try:
            run.control.append(_parse_control(value))
        except _Bad as err:
            run.skipped.append(f"{CONTROL_FILE} line {lineno}: {err}")


def _parse_audit(value: Any) -> dict[str, Any]:
    record = _object(value, "the line")
    for key in ("step", "layer_id", "edit_step"):
        _int(record.get(key), key)
    _str(record.get("action"), "action")
    _choice(record.get("verdict"), "verdict", ("kept", "rolled_back"))
    for key in ("predicted", "realised", "loss"):
        _object(record.get(key), key)
    _number(record["predicted"].get("delta_F"), "predicted.delta_F")
    return record


def _load_audits(run: RunData) -> None:
    note = "missing (written once an executed edit has been audited)"
    for lineno, value in _json_lines(run.run_dir / AUDITS_FILE, run.skipped, note):
        try:
            run.audits.append(_parse_audit(value))
        except _Bad as err:
            run.skipped.append(f"{AUDITS_FILE} line {lineno}: {err}")


def _load_lineage(run: RunData, slot_counts: dict[int, int]) -> None:
    data = _json_file(run.run_dir / LINEAGE_FILE, run.skipped)
    if data is None:
        return
    try:
        run.lineage_step = _opt_int(data.get("step"), "step")
        experts = _list(data.get("experts"), "experts")
    except _Bad as err:
        run.skipped.append(f"{LINEAGE_FILE}: {err}")
        return
    seen: set[str] = set()
    for i, entry in enumerate(experts):
        label = f"experts[{i}]"
        if isinstance(entry, dict) and isinstance(entry.get("expert_id"), str):
            label += f" ({_short(entry['expert_id'], 30)})"
        try:
            life = _parse_life(entry, slot_counts)
        except _Bad as err:
            run.skipped.append(f"{LINEAGE_FILE} {label}: {err}")
            continue
        if life.expert_id in seen:
            run.skipped.append(f"{LINEAGE_FILE} {label}: expert id repeated; kept the first")
            continue
        seen.add(life.expert_id)
        run.lineage.append(life)


def _load_basins(run: RunData) -> None:
    data = _json_file(run.run_dir / BASINS_FILE, run.skipped, "missing (written only when token ids were given)")
    if data is None:
        return
    try:
        run.basins_step = _opt_int(data.get("step"), "step")
        experts = _object(data.get("experts"), "experts")
    except _Bad as err:
        run.skipped.append(f"{BASINS_FILE}: {err}")
        return
    vocab = data.get("vocabulary")
    if isinstance(vocab, list) and all(isinstance(t, str) for t in vocab):
        run.vocabulary = list(vocab)
    elif vocab is not None:
        run.skipped.append(f"{BASINS_FILE}: vocabulary is not a list of strings; tokens are shown by id")
    for expert_id, entry in experts.items():
        try:
            run.basins.append(_parse_basin(expert_id, entry))
        except _Bad as err:
            run.skipped.append(f"{BASINS_FILE} experts[{_short(expert_id, 30)}]: {err}")


def load_run(run_dir: str | Path) -> RunData:
    """Read every file of a run directory (`docs/run_report.md`, format 1), tolerantly.

    Takes the run directory's path. Returns a `RunData` with what could be read and one note in
    `RunData.skipped` per file, line or record that could not be (missing, unreadable, torn, not UTF-8,
    not JSON, not in the format). Raises `ReportInputError` when `run_dir` does not exist or is not a directory.
    """
    path = Path(run_dir)
    if not path.exists():
        raise ReportInputError(f"run directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise ReportInputError(f"run directory {str(path)!r} is not a directory")
    run = RunData(run_dir=path)
    _load_manifest(run)
    slot_counts = {layer_id: info.num_slots for layer_id, info in run.layers.items()}
    _load_readings(run, slot_counts)
    _load_decisions(run)
    _load_control(run)
    _load_audits(run)
    _load_lineage(run, slot_counts)
    _load_basins(run)
    return run


# ---------------------------------------------------------------------------------------------------------
# the benchmark outcomes


@dataclass
class OutcomeRun:
    """One run of the outcome benchmark: its validation curve, final value and per-layer Neff over time."""

    scenario: str
    arm: str
    seed: int
    eval_steps: list[int]
    val_nats: list[float]
    final_val_nats: float
    log_steps: list[int]
    neff: list[list[float | None]]


@dataclass
class Outcomes:
    """The readable runs of an `outcomes.json`, its protocol dict, and a note per run left out."""

    path: Path
    protocol: dict[str, Any] | None
    runs: list[OutcomeRun]
    skipped: list[str] = field(default_factory=list)

    def scenarios(self) -> list[str]:
        """Scenario names in order of first appearance."""
        return list(dict.fromkeys(r.scenario for r in self.runs))

    def arms(self) -> list[str]:
        """Arm names, "plain" first, then in order of first appearance."""
        arms = list(dict.fromkeys(r.arm for r in self.runs))
        return sorted(arms, key=lambda a: a != "plain")


@dataclass
class PairedDelta:
    """Per seed, an arm's final_val_nats minus the plain arm's in the same scenario and seed."""

    scenario: str
    arm: str
    seeds: list[int]
    deltas: list[float]

    @property
    def n(self) -> int:
        """Number of paired seeds."""
        return len(self.deltas)

    @property
    def mean(self) -> float:
        """Mean delta over the paired seeds (NaN when there are none)."""
        return sum(self.deltas) / len(self.deltas) if self.deltas else math.nan

    @property
    def sd(self) -> float:
        """Sample standard deviation (n - 1) of the deltas; NaN with fewer than two seeds."""
        if len(self.deltas) < 2:
            return math.nan
        m = self.mean
        return math.sqrt(sum((d - m) ** 2 for d in self.deltas) / (len(self.deltas) - 1))

    @property
    def wins(self) -> int:
        """Seeds where the arm ended below plain (delta < 0)."""
        return sum(1 for d in self.deltas if d < 0)


def _parse_outcome_run(data: Any) -> OutcomeRun:
    run = _object(data, "the run")
    for key in ("scenario", "arm", "seed", "eval_steps", "val_nats", "final_val_nats"):
        if key not in run:
            raise _Bad(f"missing key {key!r}")
    eval_steps = [_int(s, f"eval_steps[{i}]") for i, s in enumerate(_list(run["eval_steps"], "eval_steps"))]
    val_raw = _list(run["val_nats"], "val_nats")
    if len(val_raw) != len(eval_steps):
        raise _Bad(f"val_nats has {len(val_raw)} entries; expected {len(eval_steps)} (one per eval step)")
    log_steps = [_int(s, f"log_steps[{i}]") for i, s in enumerate(_list(run.get("log_steps", []), "log_steps"))]
    neff_raw = _list(run.get("neff", []), "neff")
    if len(neff_raw) != len(log_steps):
        raise _Bad(f"neff has {len(neff_raw)} entries; expected {len(log_steps)} (one per log step)")
    neff = [
        [_opt_number(v, f"neff[{i}][{j}]") for j, v in enumerate(_list(row, f"neff[{i}]"))]
        for i, row in enumerate(neff_raw)
    ]
    return OutcomeRun(
        scenario=_str(run["scenario"], "scenario"),
        arm=_str(run["arm"], "arm"),
        seed=_int(run["seed"], "seed"),
        eval_steps=eval_steps,
        val_nats=[_number(v, f"val_nats[{i}]") for i, v in enumerate(val_raw)],
        final_val_nats=_number(run["final_val_nats"], "final_val_nats"),
        log_steps=log_steps,
        neff=neff,
    )


def load_outcomes(path: str | Path) -> Outcomes:
    """Read an outcome benchmark's JSON (`{"format": 1, "protocol": {...}, "runs": [...]}`), tolerantly.

    Takes the file's path. Returns `Outcomes` with the well-formed runs and a note per run left out
    (malformed, or a repeat of an earlier scenario/arm/seed). Raises `ReportInputError` when the file does
    not exist, cannot be read, is not a JSON object, or has no `runs` list.
    """
    p = Path(path)
    if not p.exists():
        raise ReportInputError(f"outcomes file {str(p)!r} does not exist")
    if p.is_dir():
        raise ReportInputError(f"outcomes file {str(p)!r} is a directory; expected a JSON file")
    problems: list[str] = []
    data = _json_file(p, problems)
    if data is None:
        raise ReportInputError(f"outcomes file {str(p)!r} cannot be used: {problems[0].removeprefix(p.name + ': ')}")
    runs_raw = data.get("runs")
    if not isinstance(runs_raw, list):
        raise ReportInputError(f"outcomes file {str(p)!r}: 'runs' is {_kind(runs_raw)}; expected a list of runs")
    protocol = data.get("protocol")
    outcomes = Outcomes(p, protocol if isinstance(protocol, dict) else None, [])
    if data.get("format", 1) != 1:
        outcomes.skipped.append(f"{p.name}: format={_short(data.get('format'))}; expected 1 (read as format 1)")
    seen: set[tuple[str, str, int]] = set()
    for i, entry in enumerate(runs_raw):
        try:
            run = _parse_outcome_run(entry)
        except _Bad as err:
            outcomes.skipped.append(f"{p.name} runs[{i}]: {err}")
            continue
        key = (run.scenario, run.arm, run.seed)
        if key in seen:
            outcomes.skipped.append(f"{p.name} runs[{i}]: repeats scenario {run.scenario!r}, arm {run.arm!r}, "
                                    f"seed {run.seed}; kept the first")
            continue
        seen.add(key)
        outcomes.runs.append(run)
    return outcomes


def paired_deltas(outcomes: Outcomes, baseline: str = "plain") -> tuple[list[PairedDelta], list[str]]:
    """Per scenario and non-baseline arm, the per-seed deltas of final_val_nats vs the baseline arm.

    Takes the loaded `Outcomes` and the baseline arm's name. Returns the `PairedDelta`s (scenario order,
    then arm order) and a note per run that has no baseline run of the same scenario and seed to pair with.
    """
    base = {(r.scenario, r.seed): r.final_val_nats for r in outcomes.runs if r.arm == baseline}
    out: list[PairedDelta] = []
    notes: list[str] = []
    for scenario in outcomes.scenarios():
        for arm in outcomes.arms():
            if arm == baseline:
                continue
            runs = sorted((r for r in outcomes.runs if r.scenario == scenario and r.arm == arm), key=lambda r: r.seed)
            if not runs:
                continue
            pair = PairedDelta(scenario, arm, [], [])
            for r in runs:
                if (scenario, r.seed) not in base:
                    notes.append(f"scenario {scenario!r}, arm {arm!r}, seed {r.seed}: no {baseline!r} run to pair with")
                    continue
                pair.seeds.append(r.seed)
                pair.deltas.append(r.final_val_nats - base[(scenario, r.seed)])
            out.append(pair)
    return out, notes
