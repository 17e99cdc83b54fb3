"""Logs and JSON files under damage: garbage bytes, deep nesting, missing newlines, failed writes
(docs/reliability.md, "Files, logs and checkpoints"). Each test reproduces a defect of the former readers and
writers."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from chronomoe_v3 import jsonl
from chronomoe_v3.jsonl import CorruptFileError, FileWriteError, append_jsonl, load_jsonl, write_json_atomic
from chronomoe_v3.lifecycle.decisions import (
    DecisionLog,
    DecisionRecord,
    ExpertCoherence,
    PredictedFreeEnergy,
    load_decisions,
)
from chronomoe_v3.report import load_run
from chronomoe_v3.telemetry import RoutingEvent, TelemetryWriter, TokenCounter, load_manifest, load_routing_events

DEEP = b"[" * 100_000


def record(step: int) -> DecisionRecord:
    return DecisionRecord(
        step=step, run_id="r", clock="slow", action="do_nothing", layer_id=0, expert_id=None,
        coherence_state=ExpertCoherence(), free_energy=PredictedFreeEnergy.unchanged(1.0), trigger="scheduled",
    )


def event(step: int) -> RoutingEvent:
    return RoutingEvent.from_router_output("r", step, "TRAIN", 0, [step, 1, 0, 2], 4, 2)


def steps(records: list[Any]) -> list[int]:
    return [r.step for r in records]


# ---------------------------------------------------------------------------------------------------------
# readers: garbage and nesting cost one line, never the file


@pytest.mark.parametrize("tail", [b"\xff\xfe\x00garbage\n", b"\xff\xfe\x00garbage", b"\x80"])
def test_binary_garbage_costs_only_its_line_in_the_decision_log(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path)
    log.append(record(1))
    log.append(record(2))
    with open(path, "ab") as f:
        f.write(b"\xc3\x28 not utf-8 in the middle\n")
    log.append(record(3))  # a record after the garbage is kept too
    with open(path, "ab") as f:
        f.write(tail)
    skipped: list[str] = []
    with pytest.warns(UserWarning, match="not UTF-8"):
        assert steps(load_decisions(path, skipped=skipped)) == [1, 2, 3]
    assert len(skipped) == 2 and ":3: not UTF-8 text (byte 0xc3 at column 1)" in skipped[0]
    with pytest.raises(CorruptFileError, match=r"decisions\.jsonl:3: not UTF-8"):
        load_decisions(path, strict=True)


def test_binary_garbage_costs_only_its_line_in_the_events_file(tmp_path: Path) -> None:
    writer = TelemetryWriter("run", tmp_path)
    writer.write_events([event(1), event(2)])
    with open(writer.events_path, "ab") as f:
        f.write(os.urandom(64).replace(b"\n", b"") + b"\n\xff\xff")
    with pytest.warns(UserWarning):
        assert steps(load_routing_events(writer.events_path)) == [1, 2]
    with pytest.warns(UserWarning, match="torn last line"):
        writer = TelemetryWriter("run", tmp_path)  # reopening closes the garbage tail with a newline
    writer.write_events([event(3)])
    with pytest.warns(UserWarning):
        assert steps(load_routing_events(writer.events_path)) == [1, 2, 3]


@pytest.mark.parametrize("payload", [DEEP, b'{"a":' * 50_000, b"[" * 129 + b"]" * 129])
def test_deep_nesting_is_refused_for_that_line_only(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "decisions.jsonl"
    DecisionLog(path).append(record(1))
    with open(path, "ab") as f:
        f.write(payload + b"\n")
    DecisionLog(path).append(record(2))
    with open(path, "ab") as f:
        f.write(payload)  # and as a torn tail
    skipped: list[str] = []
    with pytest.warns(UserWarning, match="nested too deeply"):
        assert steps(load_decisions(path, skipped=skipped)) == [1, 2]
    assert "torn last line (not valid JSON (nested too deeply))" in skipped[-1]
    with pytest.raises(CorruptFileError, match="nested too deeply"):
        load_decisions(path, strict=True)


def test_nesting_up_to_the_limit_still_parses() -> None:
    deep = "[" * jsonl.MAX_DEPTH + "]" * jsonl.MAX_DEPTH
    assert jsonl.parse_json_text(deep) is not None
    assert jsonl.nesting_depth('{"a": "[[[[{{{", "b": [[1]]}') == 3  # brackets inside strings do not count
    assert jsonl.nesting_depth('["a\\"[[[", [2]]') == 2


def test_deep_or_garbage_manifest_is_a_corrupt_file_error(tmp_path: Path) -> None:
    path = tmp_path / "run_manifest.json"
    for content in (DEEP, b"\xff\xfe{}", b"[1, 2]", b'{"run_id": "r"'):
        path.write_bytes(content)
        with pytest.raises(CorruptFileError, match="run_manifest.json") as info:
            load_manifest(path)
        assert info.value.path == path


def test_report_loader_reads_around_a_deep_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    good = record(4).to_json().encode()
    (run_dir / "lifecycle_decisions.jsonl").write_bytes(good + b"\n" + DEEP + b"\n" + b"\xff\n" + good + b"\n" + DEEP)
    run = load_run(run_dir)
    assert steps(run.decisions) == [4, 4]
    notes = [n for n in run.skipped if n.startswith("lifecycle_decisions")]
    assert notes == [
        "lifecycle_decisions.jsonl line 2: not valid JSON (nested too deeply)",
        "lifecycle_decisions.jsonl line 3: not UTF-8 text (byte 0xff at column 1)",
        "lifecycle_decisions.jsonl line 5: torn last line (no newline; not valid JSON (nested too deeply))",
    ]


# ---------------------------------------------------------------------------------------------------------
# appends: a record without its newline is kept, a torn one stays its own line


def test_reopening_a_log_whose_last_record_lacks_its_newline_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    path.write_text(record(1).to_json())  # complete, no newline (e.g. written by another tool)
    with pytest.warns(UserWarning, match="had no newline; added one"):
        log = DecisionLog(path)
    log.append(record(2))
    assert steps(load_decisions(path)) == [1, 2]
    assert path.read_text().splitlines() == [record(1).to_json(), record(2).to_json()]


def test_appending_after_a_torn_record_keeps_it_as_a_separate_skippable_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    append_jsonl(path, [event(1).to_dict()])
    torn = json.dumps(event(2).to_dict())[:30]
    with open(path, "a") as f:
        f.write(torn)
    with pytest.warns(UserWarning, match="torn last line"):
        append_jsonl(path, [event(3).to_dict()])  # without reopening: the append itself terminates the line
    assert path.read_text().splitlines()[1] == torn  # nothing already on disk is cut off
    with pytest.warns(UserWarning, match=r"events\.jsonl:2: not valid JSON"):
        assert steps(load_jsonl(path, RoutingEvent.from_dict)) == [1, 3]


def test_telemetry_writer_keeps_an_unterminated_complete_event(tmp_path: Path) -> None:
    writer = TelemetryWriter("run", tmp_path)
    writer.write_events([event(1)])
    with open(writer.events_path, "a") as f:
        f.write(json.dumps(event(2).to_dict()))
    with pytest.warns(UserWarning, match="added one"):
        writer = TelemetryWriter("run", tmp_path)
    writer.write_events([event(3)])
    assert steps(load_routing_events(writer.events_path)) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------
# failed appends: the caller is told, memory and disk agree


def _failing_write(monkeypatch: pytest.MonkeyPatch, path: Path, keep: int) -> list[int]:
    """Make os.write on `path` write `keep` bytes and then fail with ENOSPC (other files are untouched)."""
    real = os.write
    calls: list[int] = []

    def write(fd: int, data: Any) -> int:
        st = os.fstat(fd)
        if path.exists() and (st.st_dev, st.st_ino) == (path.stat().st_dev, path.stat().st_ino):
            calls.append(len(data))
            if keep:
                real(fd, bytes(data)[:keep])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return calls


@pytest.mark.parametrize("keep", [0, 25])
def test_failed_decision_append_raises_naming_the_file_and_keeps_memory_equal_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: int
) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path)
    log.append(record(1))
    before = path.read_bytes()
    calls = _failing_write(monkeypatch, path, keep)
    with pytest.raises(FileWriteError, match="decisions.jsonl") as info:
        log.append(record(2))
    assert calls and isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert info.value.filename == str(path) and "No space left" in str(info.value)
    assert steps(log.records) == [1]  # not kept in memory either
    assert path.read_bytes() == before  # the partial line was cut off again
    monkeypatch.undo()
    log.append(record(3))  # the log goes on
    assert steps(load_decisions(path)) == steps(log.records) == [1, 3]


def test_failed_batch_append_writes_nothing_of_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    append_jsonl(path, [event(1).to_dict()])
    before = path.read_bytes()
    _failing_write(monkeypatch, path, keep=300)
    with pytest.raises(FileWriteError, match="events.jsonl"):
        append_jsonl(path, [event(2).to_dict(), event(3).to_dict()])
    assert path.read_bytes() == before


def test_unserialisable_record_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "readings.jsonl"
    with pytest.raises(ValueError):
        append_jsonl(path, [{"step": 1}, {"loss": float("nan")}])
    assert not path.exists() or path.read_bytes() == b""


def test_append_to_an_unwritable_place_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "missing_dir" / "log.jsonl"
    with pytest.raises(FileWriteError, match="missing_dir"):
        append_jsonl(target, [{"a": 1}])


# ---------------------------------------------------------------------------------------------------------
# whole JSON files: atomic and durable


def test_write_json_atomic_fsyncs_the_file_and_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else str(fd))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "lineage.json"
    write_json_atomic(path, {"step": 1})
    assert json.loads(path.read_text()) == {"step": 1}
    if os.path.exists("/proc/self/fd"):
        assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lineage.json"]


def test_write_json_atomic_failure_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "basins.json"
    write_json_atomic(path, {"step": 1})

    def replace(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(FileWriteError, match="basins.json"):
        write_json_atomic(path, {"step": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["basins.json"]  # the temporary file is gone
    with pytest.raises(ValueError):
        write_json_atomic(path, {"x": float("inf")})
    assert json.loads(path.read_text()) == {"step": 1}


def test_writer_sets_an_unreadable_manifest_aside(tmp_path: Path) -> None:
    TelemetryWriter("run", tmp_path, metadata={"model": "toy"})
    manifest = tmp_path / "run" / "run_manifest.json"
    manifest.write_bytes(b'{"run_id": "run", "cre\xff')
    with pytest.warns(UserWarning, match="unreadable-1"):
        TelemetryWriter("run", tmp_path, metadata={"model": "toy"})
    assert load_manifest(manifest)["metadata"] == {"model": "toy"}
    assert (tmp_path / "run" / "run_manifest.json.unreadable-1").read_bytes().endswith(b"\xff")


# ---------------------------------------------------------------------------------------------------------
# the token counter: validate first, then consume


def test_token_counter_refusal_consumes_nothing() -> None:
    counter = TokenCounter(n_layers=2, n_slots=3)
    counter.add(0, torch.tensor([1, 2, 3]))
    counter.add(1, torch.tensor([-1, 0, 4]))  # a negative count is only found at report time
    with pytest.raises(ValueError, match="non-negative"):
        counter.to_events("r", 1, "TRAIN", 1)
    assert counter.counts.tolist() == [[1, 2, 3], [-1, 0, 4]]  # nothing lost
    counter.add(1, torch.tensor([1, 0, 0]))
    events = counter.to_events("r", 1, "TRAIN", 1)
    assert [e.expert_token_counts for e in events] == [[1, 2, 3], [0, 0, 4]]
    assert counter.counts.sum().item() == 0
    with pytest.raises(ValueError, match="no active slot"):
        counter.add(0, torch.tensor([5, 0, 0]))
        counter.to_events("r", 2, "TRAIN", 1, active_masks=torch.tensor([[True, True, True], [False] * 3]))
    assert counter.counts.tolist() == [[5, 0, 0], [0, 0, 0]]
