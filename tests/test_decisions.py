"""The JSONL decision log: format, schema, persistence, torn lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chronomoe_v3.lifecycle.decisions import (
    CompetingEdit,
    DecisionLog,
    DecisionRecord,
    ExpertCoherence,
    PredictedFreeEnergy,
    load_decisions,
)

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "docs" / "decision_log.schema.json"
SPEC_KEYS = [
    "step", "run_id", "clock", "action", "layer_id", "expert_id", "child_id", "coherence_state", "free_energy",
    "competing_edits", "trigger", "reason",
]

_TYPES: dict[str, Any] = {
    "object": dict, "array": list, "string": str, "null": type(None), "boolean": bool,
}


def _type_ok(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Errors of `value` against the subset of JSON Schema the decision log schema uses."""
    errors: list[str] = []
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_ok(value, n) for n in names):
            return [f"{path}: {value!r} is not of type {names}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and _type_ok(value, "number") and value < schema["minimum"]:
        errors.append(f"{path}: {value!r} < {schema['minimum']}")
    if "minLength" in schema and isinstance(value, str) and len(value) < schema["minLength"]:
        errors.append(f"{path}: {value!r} shorter than {schema['minLength']}")
    if isinstance(value, dict):
        errors += [f"{path}: missing {k}" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: unexpected {k}" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                errors += validate(v, props[k], f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += validate(v, schema["items"], f"{path}[{i}]")
    return errors


def _schema() -> dict[str, Any]:
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    return schema


def split_record(step: int = 120) -> DecisionRecord:
    return DecisionRecord(
        step=step,
        run_id="run-a",
        clock="slow",
        action="split",
        layer_id=2,
        expert_id="L2_E5",
        child_id="L2_E7",
        coherence_state=ExpertCoherence(0.41, 0.44, 0.47, -0.05, 0.6),
        free_energy=PredictedFreeEnergy(0.9, 0.85, -0.05, -0.02, 0.01, 0.0, -0.04),
        competing_edits=(
            CompetingEdit("prune", "L2_E1", -0.004, "worst slow coherence"),
            CompetingEdit("merge", "L2_E3", 0.01, "most redundant pair", partner_id="L2_E0"),
        ),
        trigger="scheduled",
        reason="most bimodal expert",
    )


def nothing_record() -> DecisionRecord:
    return DecisionRecord(
        step=130, run_id="run-a", clock="slow", action="do_nothing", layer_id=0, expert_id=None,
        coherence_state=ExpertCoherence(), free_energy=PredictedFreeEnergy.unchanged(0.7),
        competing_edits=(CompetingEdit("spawn", None, 0.003, "starvation 2%"),), trigger="emergency",
    )


def test_line_format_follows_spec_order_and_optional_keys() -> None:
    full = split_record().to_dict()
    assert list(full) == SPEC_KEYS
    assert list(full["coherence_state"]) == ["phi_fast", "phi_mid", "phi_slow", "beta", "bimodality", "evidence"]
    assert list(full["free_energy"]) == ["F_before", "F_after_predicted", "delta_F", "components"]
    assert list(full["free_energy"]["components"]) == [
        "misfit_delta", "complexity_delta", "redundancy_delta", "instability_delta",
    ]
    bare = nothing_record().to_dict()
    assert "child_id" not in bare and "reason" not in bare
    assert bare["free_energy"]["delta_F"] == 0.0 and bare["coherence_state"]["phi_slow"] is None


def test_written_lines_validate_against_schema_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "decisions.jsonl"
    log = DecisionLog(path)
    records = [split_record(), nothing_record()]
    for r in records:
        log.append(r)
    assert len(log) == 2 and list(log) == records
    schema = _schema()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert validate(json.loads(line), schema) == []
    assert load_decisions(path) == records


def test_validator_rejects_bad_lines() -> None:
    schema = _schema()
    good = split_record().to_dict()
    assert validate({k: v for k, v in good.items() if k != "trigger"}, schema) == ["$: missing trigger"]
    assert validate({**good, "extra": 1}, schema) == ["$: unexpected extra"]
    assert validate({**good, "action": "grow"}, schema)
    assert validate({**good, "step": -1}, schema)
    bad_fe = json.loads(json.dumps(good))
    bad_fe["free_energy"]["components"]["misfit_delta"] = "x"
    assert validate(bad_fe, schema)


def test_no_path_keeps_records_in_memory_only(tmp_path: Path) -> None:
    log = DecisionLog(None)
    log.append(split_record())
    assert len(log) == 1 and log.path is None
    assert list(tmp_path.iterdir()) == []


def test_torn_last_line_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path)
    log.append(split_record(1))
    log.append(split_record(2))
    with open(path, "a", encoding="utf-8") as f:
        f.write(split_record(3).to_json()[:40])  # crash mid-write
    with pytest.warns(UserWarning, match="torn"):
        assert [r.step for r in load_decisions(path)] == [1, 2]
    with pytest.warns(UserWarning, match="torn"):
        reopened = DecisionLog(path)  # closes the torn tail with a newline so the next line starts cleanly
    reopened.append(split_record(4))
    with pytest.warns(UserWarning, match=r":3: not valid JSON"):  # the torn line stays, skipped
        assert [r.step for r in load_decisions(path)] == [1, 2, 4]
    lines = path.read_text().splitlines()
    lines.insert(1, "{not json")
    path.write_text("\n".join(lines) + "\n")
    skipped: list[str] = []
    with pytest.warns(UserWarning, match=r":2: not valid JSON"):
        assert [r.step for r in load_decisions(path, skipped=skipped)] == [1, 2, 4]
    assert len(skipped) == 2 and ":2: not valid JSON" in skipped[0] and ":4: not valid JSON" in skipped[1]
    with pytest.raises(ValueError, match=r":2: not valid JSON"):
        load_decisions(path, strict=True)


def test_records_are_validated() -> None:
    good = split_record()
    with pytest.raises(ValueError, match="action='grow'"):
        DecisionRecord(**{**good.__dict__, "action": "grow"})
    with pytest.raises(ValueError, match="clock"):
        DecisionRecord(**{**good.__dict__, "clock": "hourly"})
    with pytest.raises(ValueError, match="step"):
        DecisionRecord(**{**good.__dict__, "step": -3})
    with pytest.raises(ValueError, match="components sum"):
        PredictedFreeEnergy(1.0, 0.9, -0.1, -0.5, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="F_after_predicted"):
        PredictedFreeEnergy(1.0, 0.5, -0.1, -0.1)
    with pytest.raises(ValueError, match="finite"):
        PredictedFreeEnergy(float("nan"), 0.9, -0.1, -0.1)
    assert ExpertCoherence(phi_slow=float("nan")).phi_slow is None  # unknown readings are written as null
    with pytest.raises(ValueError, match="unknown keys"):
        DecisionRecord.from_dict({**good.to_dict(), "surprise": True})
    with pytest.raises(ValueError, match="DecisionRecord"):
        DecisionLog(None).append(good.to_dict())  # type: ignore[arg-type]
