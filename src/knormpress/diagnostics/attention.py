"""Does a key's norm say how much attention it draws? Measured on a model reading a text uncompressed.

Per layer and KV head, over the keys j = 0..T-2 of one text:

- received_j: the attention key j receives from the later queries that see it, q = j+1..T-1 (within
  the layer's window on a sliding layer), averaged over those queries and over the query heads of
  the KV group. The key's own query is left out: every query attends to itself, whatever its norm,
  and the question is what a cache gains by keeping the key for later queries (the last key, seen by
  no later query, is left out too);
- spearman: the Spearman rank correlation between |k_j| and received_j (KnormPress' premise: low
  norm, high attention, so negative where it holds). |k_j| is the key the cache holds (after the
  model's key normalisation and rotary, which keeps the norm), as keep_low ranks it;
- spearman_projected: the same with the norm of the key projection's output (`k_proj`), before any
  key normalisation: on models that normalise keys (Gemma 3's k_norm, QK-norm) the two differ, and
  the pair says whether the normalisation removed the signal; NaN for models without a `k_proj`;
- the distribution of |k_j|: quantiles NORM_QUANTILES.

The attention function records in blocks of BLOCK queries over the keys they reach (no T x T
matrix per layer), and returns the model's own attention output, so later layers see the
uncompressed model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from knormpress.engines.base import OnePassPlan, one_pass, plan_of
from knormpress.engines.maths import (BLOCK, bytes_per_token, cache_windows, grouped_weights, held_uncompressed,
                                      layer_window, no_mask, plain_attention)

ATTN = "knorm_diagnose"
NORM_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class _Plan(OnePassPlan):
    received: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (Hkv, T) attention from later queries, mean
    norms: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (Hkv, T) |k| as the cache holds it
    projected: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (Hkv, T) |k_proj output|


def diagnose_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The model's own attention of query (1, Hq, T, D) over key/value (1, Hkv, T, D), recording what
    each key receives from later queries and its norm."""
    plan = plan_of(kwargs, _Plan, ATTN)
    layer, T = module.layer_idx, key.shape[2]
    window, softcap = layer_window(kwargs, layer, plan.windows, "diagnose"), kwargs.get("softcap")
    plan.held[layer] = (held_uncompressed(T, window), bytes_per_token(key, value))
    plan.received[layer] = received_attention(query, key, scaling, window, softcap)
    plan.norms[layer] = torch.linalg.vector_norm(key[0].to(plan.received[layer].dtype), dim=-1)
    return plain_attention(query, key, value, scaling, window, softcap).transpose(1, 2), None


def received_attention(query: torch.Tensor, key: torch.Tensor, scaling: float | None, window: int | None = None,
                       softcap: float | None = None) -> torch.Tensor:
    """(Hkv, T) the mean attention key j gets from the queries q > j that see it (q - window < j on a
    sliding layer), over those queries and the query heads of its group; NaN for the last key."""
    Hq, T = query.shape[1], key.shape[2]
    Hkv = key.shape[1]
    total = torch.zeros(Hkv, T, dtype=torch.promote_types(key.dtype, torch.float32), device=key.device)
    for q0 in range(0, T, BLOCK):
        q1, k0 = min(q0 + BLOCK, T), 0 if window is None else max(q0 - window + 1, 0)
        q = torch.arange(q0, q1, device=key.device).view(-1, 1)
        j = torch.arange(k0, q1, device=key.device)
        visible = (j <= q) if window is None else (j <= q) & (j > q - window)
        w = grouped_weights(query[:, :, q0:q1], key[:, :, k0:q1], scaling, visible, softcap)  # (1, Hkv, g, q, n)
        total[:, k0:q1] += (w[0] * (j < q)).sum(dim=(1, 2))
    j = torch.arange(T, device=key.device)
    last = torch.full_like(j, T - 1) if window is None else torch.clamp(j + window - 1, max=T - 1)
    later = (last - j).float()  # the queries after j that see it
    return total / (later * (Hq // Hkv))  # 0 / 0 = NaN for the last key


def _hooks(model: PreTrainedModel, plan: _Plan) -> list:
    """Record the norm of each attention layer's key projection output (before any key normalisation)."""
    handles = []
    for module in model.modules():
        proj, layer = getattr(module, "k_proj", None), getattr(module, "layer_idx", None)
        if proj is None or layer is None or not hasattr(module, "head_dim"):
            continue

        def record(_, __, out, layer=layer, head_dim=module.head_dim):
            keys = out[0].unflatten(-1, (-1, head_dim))
            plan.projected[layer] = torch.linalg.vector_norm(keys.to(torch.promote_types(keys.dtype, torch.float32)), dim=-1).t()
        handles.append(proj.register_forward_hook(record))
    return handles


@torch.no_grad()
def measure(model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[pd.DataFrame, dict[str, float]]:
    """One uncompressed pass over `input_ids` (T,): a row per (layer, KV head) with spearman,
    spearman_projected, mean_received and the key-norm quantiles (`norm_q05`, ...), and the memory
    held (as `EngineOutput.memory` words it)."""
    ids = input_ids.view(1, -1).to(model.device)
    plan = _Plan(None, cache_windows(model))
    handles = _hooks(model, plan)
    try:
        _, tokens, nbytes = one_pass(model, ids, ATTN, plan)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for layer in sorted(plan.received):
        received, norms = plan.received[layer], plan.norms[layer]
        projected = plan.projected.get(layer)
        for head in range(received.shape[0]):
            seen = slice(0, ids.shape[1] - 1)
            row = {"layer": layer, "head": head, "window": plan.windows[layer] or 0,
                   "spearman": spearman(norms[head, seen], received[head, seen]),
                   "spearman_projected": (float("nan") if projected is None
                                          else spearman(projected[head, seen], received[head, seen])),
                   "mean_received": received[head, seen].mean().item()}
            qs = torch.quantile(norms[head], torch.tensor(NORM_QUANTILES, dtype=norms.dtype))
            rows.append(row | {f"norm_q{round(100 * q):02d}": v.item() for q, v in zip(NORM_QUANTILES, qs)})
    memory = {"kv_tokens_peak": tokens.max().item(), "kv_tokens_mean": tokens.mean().item(),
              "kv_bytes_peak": nbytes.max().item(), "kv_bytes_mean": nbytes.mean().item()}
    return pd.DataFrame(rows), memory


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties get their mean rank)."""
    rx, ry = (pd.Series(v.double().cpu().numpy()).rank().to_numpy() for v in (x, y))
    return float(np.corrcoef(rx, ry)[0, 1])


AttentionInterface.register(ATTN, diagnose_attention)
AttentionMaskInterface.register(ATTN, no_mask)
