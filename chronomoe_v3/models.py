"""TinyMoELM: a small causal language model built from ChronoMoELayer, for examples, tests and experiments."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ChronoMoELayer


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, moe: ChronoMoELayer) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.moe = moe
        self.n_heads = n_heads

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.n_heads, d // self.n_heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        return x + self.moe(self.norm2(x))


class TinyMoELM(nn.Module):
    """Embedding -> n_layers x (causal attention + ChronoMoELayer) -> logits."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int = 128,
        max_experts: int = 8,
        top_k: int = 2,
        num_active: int | None = None,
        max_seq_len: int = 256,
        capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is invalid: expected a multiple of n_heads={n_heads}")
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_seq_len, d_model)
        self.blocks = nn.ModuleList(
            _Block(
                d_model,
                n_heads,
                ChronoMoELayer(
                    d_model, d_ff, max_experts, top_k, num_active=num_active, capacity_factor=capacity_factor,
                    layer_id=i,
                ),
            )
            for i in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.max_seq_len = max_seq_len

    @property
    def moe_layers(self) -> list[ChronoMoELayer]:
        return [blk.moe for blk in self.blocks]  # type: ignore[misc]

    def forward(self, idx: Tensor) -> Tensor:
        s = idx.shape[1]
        if s > self.max_seq_len:
            raise ValueError(f"sequence length {s} exceeds max_seq_len={self.max_seq_len}")
        x = self.tok(idx) + self.pos(torch.arange(s, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits: Tensor = self.head(self.norm(x))
        return logits

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
