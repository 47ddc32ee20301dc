"""Moving cached keys to other positions with the model's own rotary embedding (`positions=rerotate`).

Keys are cached after rotary: a key computed at position p carries the rotation R(p). Under
`rerotate` a kept key moves to its slot s in the pruned cache, i.e. it is rotated by s - p. For
rotary types whose angle is position x frequency (default, linear and llama3 scaling) rotations
compose by adding angles, R(s - p) R(p) = R(s), so the shift uses the cos/sin that the model's
rotary module gives for the offset s - p: partial rotary (GPT-NeoX rotates only the first
dimensions) and rope scaling come out as the model computes them.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from knormpress.errors import ConfigError

ADDITIVE = ("default", "linear", "llama3")  # rope types whose angles add up: R(a) R(b) = R(a + b)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary:
    """Shifts keys and queries of one model by whole positions, per layer (Gemma 3 has a rotary per layer type)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.module = getattr(model.base_model, "rotary_emb", None)
        if self.module is None:
            raise ConfigError(f"positions='rerotate' needs rotary position embeddings, which {type(model).__name__} "
                              "lacks; use positions=true")
        self.layer_types = getattr(model.config, "layer_types", None)
        kinds = self.module.rope_type
        for kind in kinds.values() if isinstance(kinds, dict) else [kinds]:
            if kind not in ADDITIVE:
                raise ConfigError(f"positions='rerotate' cannot shift keys under rope type {kind!r}; it supports "
                                  f"{', '.join(ADDITIVE)}; use positions=true")
        self._tables: dict[tuple, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def _table(self, layer: int, span: int, like: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(span, cos, sin) for offsets -span..span, rows (2 span + 1, rotary dims), from the model's module."""
        kind = None if self.layer_types is None else self.layer_types[layer]
        key = (kind, like.dtype, like.device)
        have = self._tables.get(key)
        if have is None or have[0] < span:
            span = max(span, 2 * have[0] if have else 1024)
            offsets = torch.arange(-span, span + 1, device=like.device)[None]
            extra = {} if kind is None else {"layer_type": kind}
            cos, sin = self.module(like, offsets, **extra)
            self._tables[key] = have = (span, cos[0], sin[0])
        return have

    def shift(self, x: torch.Tensor, delta: torch.Tensor | int, layer: int) -> torch.Tensor:
        """x (..., n, D) rotated by `delta` positions, an int or a tensor broadcastable to x[..., 0]."""
        if isinstance(delta, int):  # one row of the table for every vector (the replay's per-token case)
            span, cos, sin = self._table(layer, abs(delta), x)
        else:
            delta = torch.as_tensor(delta, device=x.device)
            span, cos, sin = self._table(layer, int(delta.abs().max()) if delta.numel() else 0, x)
        cos, sin = cos[delta + span], sin[delta + span]
        rot = cos.shape[-1]
        turned = x[..., :rot] * cos + _rotate_half(x[..., :rot]) * sin
        return torch.cat((turned, x[..., rot:]), dim=-1) if rot < x.shape[-1] else turned
