"""save_checkpoint / load_checkpoint: atomic, durable, and loud about damage (docs/reliability.md)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import chronomoe_v3
from chronomoe_v3 import CheckpointError, ChronoSystem, FileWriteError, load_checkpoint, save_checkpoint
from chronomoe_v3.toy.models import TinyMoELM

torch.set_num_threads(1)


def _trained(tmp_path: Path) -> tuple[TinyMoELM, torch.optim.Optimizer, ChronoSystem]:
    torch.manual_seed(0)
    model = TinyMoELM(20, d_model=16, n_heads=2, d_ff=16, max_experts=6, top_k=2, num_active=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    system = ChronoSystem(model, run_id="r", output_dir=tmp_path / "runs")
    system.attach_optimizer(opt)
    x = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(0))
    loss = model.loss(x, x)
    loss.backward()
    opt.step()
    system.step(loss=float(loss.detach()))
    return model, opt, system


def test_round_trip_of_model_optimizer_and_system(tmp_path: Path) -> None:
    model, opt, system = _trained(tmp_path)
    path = save_checkpoint(tmp_path / "ck" / "last.pt", model=model.state_dict(), optimizer=opt.state_dict(),
                           system=system.state_dict(), step=1)
    assert path == tmp_path / "ck" / "last.pt" and sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    states = load_checkpoint(path)
    assert sorted(states) == ["model", "optimizer", "step", "system"] and states["step"] == 1
    for key, value in model.state_dict().items():
        assert torch.equal(states["model"][key], value), key
    assert states["system"]["step_calls"] == system.step_calls
    assert torch.load(path, weights_only=True)["chronomoe_checkpoint"] == 1  # an ordinary torch file
    assert chronomoe_v3.save_checkpoint is save_checkpoint and "load_checkpoint" in chronomoe_v3.__all__


def test_write_is_atomic_and_fsyncs_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync " + (os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "?"))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(f"replace {Path(src).name} -> {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tmp_path / "c.pt", step=1)
    assert [e.split()[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[1].startswith("replace .c.pt.") and events[1].endswith(".tmp -> c.pt")
    if os.path.exists("/proc/self/fd"):
        assert events[0].endswith(".tmp") and events[2] == f"fsync {tmp_path}"


def test_failed_write_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, step=1)
    old = path.read_bytes()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(FileWriteError, match=r"c\.pt") as info:
        save_checkpoint(path, step=2)
    assert isinstance(info.value, OSError) and info.value.filename == str(path)
    monkeypatch.undo()
    with pytest.raises(Exception, match="lambda|pickle|Can't"):
        save_checkpoint(path, step=3, bad=lambda: None)  # torch.save refuses it: nothing written
    assert path.read_bytes() == old and load_checkpoint(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    with pytest.raises(ValueError, match="at least one state"):
        save_checkpoint(path)


def test_truncated_checkpoint_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, weights=torch.arange(1000.0), meta={"step": 3})
    data = path.read_bytes()
    for size in (0, 1, 21, 22, len(data) // 3, len(data) // 2, len(data) - 22, len(data) - 1):
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="c.pt") as info:
            load_checkpoint(path)
        assert info.value.path == path and isinstance(info.value, ValueError)


def test_flipped_bit_is_found_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, weights=torch.arange(1000.0))
    data = bytearray(path.read_bytes())
    offset = bytes(data).index(torch.arange(1000.0)[500:504].numpy().tobytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        load_checkpoint(path)
    unchecked = load_checkpoint(path, verify=False)  # what a plain torch.load would have handed back
    assert not torch.equal(unchecked["weights"], torch.arange(1000.0))


def test_foreign_and_unsafe_files_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"model": {}}, plain)
    with pytest.raises(CheckpointError, match="not a checkpoint written by save_checkpoint"):
        load_checkpoint(plain)
    unsafe = tmp_path / "unsafe.pt"
    save_checkpoint(unsafe, obj=_Opaque())
    with pytest.raises(CheckpointError, match="unsafe.pt"):
        load_checkpoint(unsafe)  # weights_only=True refuses arbitrary classes
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="text.pt"):
        load_checkpoint(text)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


class _Opaque:
    pass
