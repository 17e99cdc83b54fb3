"""TinyMoELM: a small causal language model built from ChronoMoELayer, for examples, tests and experiments."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..balance import aux_loss
from ..layers import ChronoMoELayer


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
    """Embedding -> n_layers x (causal attention + ChronoMoELayer) -> logits.

    `router_bias` gives each router a bias vector (zeros at init); `aux_loss_coef > 0` makes the layers
    compute the Switch load-balancing loss and `loss()` add `aux_loss_coef` times its mean over layers.
    """

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
        router_bias: bool = False,
        aux_loss_coef: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is invalid: expected a multiple of n_heads={n_heads}")
        if not (isinstance(aux_loss_coef, (int, float)) and math.isfinite(aux_loss_coef) and aux_loss_coef >= 0):
            raise ValueError(f"aux_loss_coef={aux_loss_coef!r} is invalid: expected a finite number >= 0")
        self.aux_loss_coef = float(aux_loss_coef)
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_seq_len, d_model)
        self.blocks = nn.ModuleList(
            _Block(
                d_model,
                n_heads,
                ChronoMoELayer(
                    d_model, d_ff, max_experts, top_k, num_active=num_active, capacity_factor=capacity_factor,
                    router_bias=router_bias, compute_aux_loss=aux_loss_coef > 0, layer_id=i,
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
        """Next-token cross-entropy, plus `aux_loss_coef` times the mean load-balancing loss of the MoE
        layers (`balance.load_balancing_loss`) in training mode when `aux_loss_coef > 0`."""
        logits = self(idx)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        if self.aux_loss_coef > 0 and self.training:
            loss = loss + self.aux_loss_coef * aux_loss(self)
        return loss
