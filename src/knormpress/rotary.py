"""Moving cached keys to other positions with the model's own rotary embedding (`positions=rerotate`).

Keys are cached after rotary: a key computed at position p carries the rotation R(p). Under
`rerotate` a kept key moves to its slot s in the pruned cache, i.e. it is rotated by s - p. For
rotary types whose angle is position x frequency (default, linear and llama3 scaling) rotations
compose by adding angles, R(s - p) R(p) = R(s), so the shift uses the cos/sin that the model's
rotary module gives for the offset s - p: partial rotary (GPT-NeoX rotates only the first
dimensions) and rope scaling come out as the model computes them.

The shift computes its cos/sin in float64 from the module's own inverse frequencies and attention
scaling (the module computes them in float32): rotations then compose to float64 rounding, R(a) R(b)
= R(a + b), so a key moved by many one-index steps (the token-by-token engine) and one moved once
by their sum (the one-pass engines) agree, and its norm does not drift over thousands of steps.
A float32 key is rotated in float64 and rounded back once.

The shift pairs dimension i with i + rot/2 (transformers' `rotate_half`). Families differ (pairs of
neighbours, scaled cos/sin, rotary applied elsewhere), so before any shift `Rotary` checks itself
against the model's own `apply_rotary_pos_emb` on random vectors: rotated by the model at p, then
shifted by d, they must equal the model's rotation at p + d, or the model is refused.
"""

from __future__ import annotations

import inspect
import sys

import torch
from transformers import PreTrainedModel

from knormpress.errors import ConfigError

ADDITIVE = ("default", "linear", "llama3")  # rope types whose angles add up: R(a) R(b) = R(a + b)
# (position p, shift d) pairs of the self-check: short and long moves, back and ahead, and to slot 0
CHECKS = ((3, 5), (40, -37), (300, 700), (1000, -1000))
TOLERANCE = 1e-3  # relative; the model's cos/sin are float32 (angles up to 1000 rad carry ~1e-5), a wrong convention is off by ~1


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary:
    """Shifts keys and queries of one model by whole positions, per layer (Gemma 3 has a rotary per
    layer type); refuses, in one line, a model whose rotary this shift does not reproduce."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.module = getattr(model.base_model, "rotary_emb", None)
        if self.module is None:
            raise ConfigError(f"positions='rerotate' moves keys with the model's rotary embedding (base_model.rotary_emb), "
                              f"which {type(model).__name__} does not have; use positions=true")
        kinds = getattr(self.module, "rope_type", "default")
        for kind in kinds.values() if isinstance(kinds, dict) else [kinds]:
            if kind not in ADDITIVE:
                raise ConfigError(f"positions='rerotate' cannot shift keys under rope type {kind!r}; it supports "
                                  f"{', '.join(ADDITIVE)}; use positions=true")
        # a rotary module per layer type (Gemma 3) takes the type; one shared by all types (Qwen2/3, Gemma 2) does not
        per_type = "layer_type" in inspect.signature(self.module.forward).parameters
        self.layer_types = getattr(model.config.get_text_config(), "layer_types", None) if per_type else None
        self._tables: dict[tuple, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._check(model)

    def _table(self, layer: int, span: int, like: torch.Tensor, dtype: torch.dtype) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(span, cos, sin) for offsets -span..span, rows (2 span + 1, rotary dims), computed in float64
        and stored in `dtype`: the model's angles (offset x inverse frequency, each frequency twice, as
        `rotate_half` pairs them)."""
        kind = None if self.layer_types is None else self.layer_types[layer]
        key = (kind, like.device, dtype)
        have = self._tables.get(key)
        if have is None or have[0] < span:
            span = max(span, 2 * have[0] if have else 1024)
            inv_freq, scaling = self._frequencies(kind)
            offsets = torch.arange(-span, span + 1, device=like.device, dtype=torch.float64)
            angles = offsets[:, None] * inv_freq.to(device=like.device, dtype=torch.float64)
            angles = torch.cat((angles, angles), dim=-1)
            self._tables[key] = have = (span, (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype))
        return have

    def _frequencies(self, kind: str | None) -> tuple[torch.Tensor, float]:
        """The rotary module's inverse frequencies and attention scaling (Gemma 3 keeps one per layer type)."""
        prefix = "" if kind is None else f"{kind}_"
        inv_freq = getattr(self.module, f"{prefix}inv_freq", None)
        if inv_freq is None:
            raise ConfigError(f"positions='rerotate' needs the rotary module's inverse frequencies ({prefix}inv_freq), "
                              f"which {type(self.module).__name__} does not keep; use positions=true")
        return inv_freq, float(getattr(self.module, f"{prefix}attention_scaling", 1.0))

    def _kind(self, layer: int) -> dict[str, str]:
        return {} if self.layer_types is None else {"layer_type": self.layer_types[layer]}

    def shift(self, x: torch.Tensor, delta: torch.Tensor | int, layer: int, once: bool = False) -> torch.Tensor:
        """x (..., n, D) rotated by `delta` positions, an int or a tensor broadcastable to x[..., 0];
        computed in float64, returned in x's dtype. `once`: a vector rotated once and never again
        (the one-pass engines' queries) may be rotated in its own dtype, which is faster."""
        dtype = x.dtype if once else torch.float64
        if isinstance(delta, int):  # one row of the table for every vector (the replay's per-token case)
            span, cos, sin = self._table(layer, abs(delta), x, dtype)
        else:
            delta = torch.as_tensor(delta, device=x.device)
            span, cos, sin = self._table(layer, int(delta.abs().max()) if delta.numel() else 0, x, dtype)
        cos, sin = cos[delta + span], sin[delta + span]
        rot = cos.shape[-1]
        part = x[..., :rot].to(dtype)
        turned = (part * cos + _rotate_half(part) * sin).to(x.dtype)
        return torch.cat((turned, x[..., rot:].expand(*turned.shape[:-1], -1)), dim=-1) if rot < x.shape[-1] else turned

    def _check(self, model: PreTrainedModel) -> None:
        """Shift vectors the model rotated at p by d and compare with the model's own rotation at p + d,
        once per layer type, with the rotary application of the model's modeling module."""
        where = type(model.base_model).__module__
        apply = getattr(sys.modules.get(where), "apply_rotary_pos_emb", None)
        label = f"{type(model).__name__} ({where})"
        if apply is None:
            raise ConfigError(f"positions='rerotate' cannot be checked on {label}: its modeling module has no "
                              "apply_rotary_pos_emb to compare the key shift with; use positions=true")
        text = model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        x = torch.randn(1, 1, len(CHECKS), head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x = x.to(next(model.parameters()).device)
        at = torch.tensor([[p for p, _ in CHECKS]], device=x.device)
        moved = torch.tensor([d for _, d in CHECKS], device=x.device)
        layers = range(text.num_hidden_layers) if self.layer_types is not None else [0]
        for layer in {self._kind(i).get("layer_type"): i for i in layers}.values():  # one layer of each type
            try:
                rotated = [apply(x, x, *self.module(x, where_to, **self._kind(layer)))[1] for where_to in (at, at + moved)]
            except (TypeError, RuntimeError, ValueError) as error:
                raise ConfigError(f"positions='rerotate' cannot be checked on {label}: its apply_rotary_pos_emb does not rotate "
                                  f"whole heads from (q, k, cos, sin) as Llama's does ({str(error).splitlines()[0]}); "
                                  "use positions=true") from error
            got = self.shift(rotated[0], moved, layer)
            error = float((got - rotated[1]).norm() / rotated[1].norm())
            if not error <= TOLERANCE:
                raise ConfigError(f"positions='rerotate' would move keys of {label} wrongly: shifting its rotated keys "
                                  f"is off by {error:.2g} (relative) from its own rotation at the new position (another "
                                  "rotary convention: interleaved pairs or scaled cos/sin); use positions=true")
