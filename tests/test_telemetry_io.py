import json

import pytest
import torch

from chronomoe_v3.jsonl import CorruptFileError
from chronomoe_v3.telemetry import (
    AlertHistory,
    RoutingEvent,
    SystemSnapshot,
    TelemetryWriter,
    TokenCounter,
    load_manifest,
    load_routing_events,
    load_snapshots,
)


def events(step):
    return [
        RoutingEvent.from_router_output("run", step, "TRAIN", lid, [step, 1, 0, 7], 4, 2, loss=0.1 * step)
        for lid in range(2)
    ]


def write_run(tmp_path, n_steps=3):
    writer = TelemetryWriter("run", tmp_path, metadata={"model": "toy"})
    history = AlertHistory()
    evs, snaps = [], []
    for step in range(n_steps):
        e = events(step)
        s = SystemSnapshot.from_events(e, step, 1.5, 1.25, "run", "toy", 2, history)
        writer.write_events(e)
        writer.write_snapshot(s)
        evs += e
        snaps.append(s)
    return writer, evs, snaps


def test_files_and_exact_round_trip(tmp_path):
    writer, evs, snaps = write_run(tmp_path)
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == ["routing_events.jsonl", "run_manifest.json", "snapshots.jsonl"]
    assert load_routing_events(run_dir) == evs
    assert load_routing_events(run_dir / "routing_events.jsonl") == evs
    assert load_snapshots(run_dir) == snaps
    manifest = load_manifest(run_dir)
    assert manifest["run_id"] == "run" and manifest["metadata"] == {"model": "toy"}
    writer.update_manifest(finished=True)
    assert load_manifest(run_dir)["finished"] is True


def test_snapshots_append_across_writers(tmp_path):
    _, _, snaps = write_run(tmp_path, 2)
    _, _, more = write_run(tmp_path, 1)
    assert load_snapshots(tmp_path / "run") == snaps + more


def test_torn_last_line_loses_only_that_line(tmp_path):
    _, evs, _ = write_run(tmp_path)
    path = tmp_path / "run" / "routing_events.jsonl"
    full = json.dumps(events(9)[0].to_dict())
    with open(path, "a") as f:
        f.write(full[: len(full) // 2])
    with pytest.warns(UserWarning, match="torn last line"):
        assert load_routing_events(path) == evs


def test_torn_line_in_the_middle_is_skipped_and_named(tmp_path):
    _, _, snaps = write_run(tmp_path)
    path = tmp_path / "run" / "snapshots.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:20]
    path.write_text("\n".join(lines) + "\n")
    skipped: list[str] = []
    with pytest.warns(UserWarning, match=r"snapshots\.jsonl:2: not valid JSON"):
        assert load_snapshots(path, skipped=skipped) == [snaps[0], snaps[2]]  # the lines around it are kept
    assert len(skipped) == 1 and "snapshots.jsonl:2: not valid JSON" in skipped[0]
    with pytest.raises(CorruptFileError, match=r"snapshots\.jsonl:2: not valid JSON") as info:
        load_snapshots(path, strict=True)
    assert info.value.path == path and info.value.line == 2 and isinstance(info.value, ValueError)


def test_invalid_record_names_file_and_line(tmp_path):
    _, evs, _ = write_run(tmp_path)
    path = tmp_path / "run" / "routing_events.jsonl"
    lines = path.read_text().splitlines()
    bad = json.loads(lines[0])
    bad["mode"] = "EVAL"
    lines[0] = json.dumps(bad)
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"routing_events\.jsonl:1: invalid record: mode must be one of"):
        assert load_routing_events(path) == evs[1:]
    with pytest.raises(ValueError, match=r"routing_events\.jsonl:1: invalid record: mode must be one of"):
        load_routing_events(path, strict=True)


def test_writer_keeps_torn_tail_as_its_own_line_before_appending(tmp_path):
    _, evs, _ = write_run(tmp_path, 1)
    path = tmp_path / "run" / "routing_events.jsonl"
    with open(path, "a") as f:
        f.write('{"timestamp": 1.0, "run')
    with pytest.warns(UserWarning, match="torn last line"):
        writer = TelemetryWriter("run", tmp_path)
    new = events(5)
    writer.write_events(new)
    with pytest.warns(UserWarning, match=r"routing_events\.jsonl:3: not valid JSON"):
        assert load_routing_events(path) == evs + new


def test_writer_rejects_path_like_run_id(tmp_path):
    with pytest.raises(ValueError, match="run_id must be"):
        TelemetryWriter("a/b", tmp_path)


def test_token_counter_accumulates_and_reports_once():
    counter = TokenCounter(n_layers=2, n_slots=4)
    counter.add(0, torch.tensor([1, 0, 2, 0]))
    counter.add(0, torch.tensor([1.0, 0.0, 1.0, 3.0]))
    counter.add_all(torch.tensor([[0, 0, 0, 0], [4, 4, 0, 0]]))
    e0, e1 = counter.to_events("r", 7, "TRAIN", top_k=2)
    assert (e0.layer_id, e0.step, e0.expert_token_counts, e0.active_experts) == (0, 7, [2, 0, 3, 3], [0, 2, 3])
    assert e1.expert_token_counts == [4, 4, 0, 0] and e1.n_experts == 4
    assert counter.counts.sum().item() == 0  # reset
    assert counter.to_events("r", 8, "TRAIN", 2)[0].token_count == 0


def test_token_counter_masks_list_active_slots_in_slot_order():
    counter = TokenCounter(n_layers=2, n_slots=4)
    counter.add_all(torch.tensor([[1, 0, 2, 3], [0, 5, 0, 6]]))
    masks = [torch.tensor([True, False, True, True]), torch.tensor([False, True, False, True])]
    e0, e1 = counter.to_events("r", 0, "TRAIN", 1, active_masks=masks, reset=False)
    assert (e0.n_experts, e0.expert_token_counts) == (3, [1, 2, 3])
    assert (e1.n_experts, e1.expert_token_counts) == (2, [5, 6])
    assert counter.counts.sum().item() == 17


def test_token_counter_add_does_not_touch_the_host(monkeypatch):
    counter = TokenCounter(n_layers=1, n_slots=3, dtype=torch.float32)
    counts = torch.tensor([1.0, 2.0, 0.0])

    def forbidden(*a, **k):
        raise AssertionError("host sync in add")

    for name in ("item", "tolist", "__bool__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    counter.add(0, counts)
    counter.add_all(counts[None])
    monkeypatch.undo()
    assert counter.counts.tolist() == [[2.0, 4.0, 0.0]]


def test_token_counter_bad_input():
    counter = TokenCounter(n_layers=2, n_slots=3)
    with pytest.raises(ValueError, match=r"counts must have shape \(3,\)"):
        counter.add(0, torch.zeros(4))
    with pytest.raises(ValueError, match="layer_id=2 outside"):
        counter.add(2, torch.zeros(3))
    with pytest.raises(ValueError, match="mode must be one of"):
        counter.to_events("r", 0, "EVAL", 1)
    with pytest.raises(ValueError, match="active_masks must be bool"):
        counter.to_events("r", 0, "TRAIN", 1, active_masks=torch.ones(2, 3))
    counter.add(0, torch.tensor([-1, 0, 0]))
    with pytest.raises(ValueError, match="non-negative"):
        counter.to_events("r", 0, "TRAIN", 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for sync debug mode")
def test_token_counter_add_has_no_cuda_sync():
    counter = TokenCounter(n_layers=2, n_slots=8, device="cuda")
    idx = torch.randint(0, 8, (4096, 2), device="cuda")
    counts = torch.zeros(8, device="cuda").index_add_(0, idx.flatten(), torch.ones(idx.numel(), device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            counter.add(1, counts)
            counter.add_all(torch.stack([counts, counts]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    (_, e1) = counter.to_events("r", 0, "TRAIN", 2)
    assert e1.token_count == 6 * 4096 * 2
