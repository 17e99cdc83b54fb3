"""The Python snippets of firststeps.md run, in order, in one namespace (the guide stays true)."""

import re
from pathlib import Path

import torch

torch.set_num_threads(1)  # tiny models: one thread is fastest, and two stall on a busy 2-core machine


def test_firststeps_snippets_run():
    text = (Path(__file__).parent.parent / "firststeps.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, "firststeps.md", "exec"), namespace)
    assert namespace["result"].coherence_state is not None
