"""The exact one-pass engine: the streaming numbers from a single forward pass.

With a static score, each key has an expiry (`knormpress.eviction.expiry`): the first query
that no longer sees it under the streaming rule. A key's score at layer l depends only on
layer l's own keys, so the attention function below can compute the expiries from the keys
it is handed and mask each query block accordingly. It is registered in transformers'
attention interface, so any architecture that dispatches through it works (Llama with GQA,
GPT-NeoX with partial rotary, Gemma 3 with sliding-window layers, ...). Assumes one unpadded
sequence, as `evaluate` passes.

What "exact" means: in exact arithmetic this engine keeps the same tokens as the streaming engine
for every query, as both apply `knormpress.eviction` to the same scores; the float64 tests
(SmolLM2, tiny models) show it. In float32 the keys of one batched pass and of one-token steps
differ in the last bits (~1e-7 relative), so a key norm within that noise of a rounding midpoint
of `strategies.key_norm` can round differently here than in the streaming engine; if that key is
at the eviction margin, the two keep different tokens, and later keys then differ by more than
rounding. On the default study (SmolLM2 in float32, 3 texts x 3000 tokens, keep_low, fix_kv_size
512, keep_ratio 0.5, skip [0, 1]) this moved the pooled perplexity by 5.7e-8 relative and changed
no token's correctness (kept sets differ at 597 of 7,458 queries, in 2.7e-6 of the kept tokens);
with fix_kv_size 256, keep_ratio 0 and every layer compressed, by 8.9e-4 and accuracy by +0.011
percentage points. `tests/test_engines_float32.py` bounds it, `diagnostics/agreement.py`
counts it, `scripts/bench_engines.py` reports it.

Sliding-window layers are never compressed (they hold at most their window already): they attend
through `plain_attention` with the window the model passes, and report what transformers' sliding
cache layer holds, the last window - 1 keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from knormpress.compression import Compression
from knormpress.engines.base import Engine, EngineOutput, OnePassPlan, one_pass, plan_of, register_engine
from knormpress.engines.maths import (BLOCK, bytes_per_token, cache_windows, compresses, held_uncompressed, layer_window,
                                      no_mask, plain_attention, sdpa)
from knormpress.eviction import expiry, held_tokens
from knormpress.strategies import CacheView

ATTN = "knorm_masked"


@register_engine
@dataclass
class Masked(Engine):
    """One forward pass by key expiry: static strategies under true positions, any interval."""

    name = "masked"
    builds_cache = False  # every query sees its keys through a mask: no pruned cache ever exists

    def refuses(self, compression: Compression | None, model: PreTrainedModel | None = None) -> str | None:
        if compression is None:
            return None
        if not compression.strategy.static:
            return f"strategy {compression.strategy.name!r} re-scores tokens at every step"
        if compression.positions != "true":
            return f"positions={compression.positions!r} moves kept keys after each pruning"
        return None

    @torch.no_grad()
    def run(self, model: PreTrainedModel, input_ids: torch.Tensor, compression: Compression | None,
            progress: bool = False) -> EngineOutput:
        return EngineOutput(*one_pass(model, input_ids, ATTN, OnePassPlan(compression, cache_windows(model))), self.name)


def masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of query (B, Hq, T, D) over key/value (B, Hkv, T, D) under the eviction rule."""
    plan = plan_of(kwargs, OnePassPlan, ATTN)
    T, layer = query.shape[2], module.layer_idx
    c = plan.compression
    per_token = bytes_per_token(key, value)
    window = layer_window(kwargs, layer, plan.windows, "masked")
    if not compresses(c, layer, T, window):
        plan.held[layer] = (held_uncompressed(T, window), per_token)
        return plain_attention(query, key, value, scaling, window, kwargs.get("softcap")).transpose(1, 2), None
    positions = torch.arange(T, device=key.device).expand(key.shape[:3])
    exp = expiry(c.strategy.score(CacheView(key, positions, layer)), c.budget, c.interval)
    plan.held[layer] = (held_tokens(exp).double().mean(dim=(0, 1)), per_token)
    return expiry_attention(query, key, value, exp, c.fix_kv_size, scaling, kwargs.get("softcap")).transpose(1, 2), None


def expiry_attention(query, key, value, exp, budget: int, scaling, softcap: float | None = None) -> torch.Tensor:
    """Causal attention while nothing is evicted, then per block of queries only over the keys
    still alive at the block's start, each query head packed with its KV group; `softcap` caps the
    logits (`maths.sdpa`)."""
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    g = Hq // Hkv
    out = torch.empty_like(query)
    head = budget + 1  # queries 0..budget see every earlier key
    out[:, :, :head] = sdpa(query[:, :, :head], key[:, :, :head], value[:, :, :head], None, scaling, softcap)
    grouped = query.view(B, Hkv, g, T, D)
    keys_at = torch.arange(T, device=key.device)
    for q0 in range(head, T, BLOCK):
        q1 = min(q0 + BLOCK, T)
        alive = (exp > q0) & (keys_at < q1)
        n = int(alive.sum(-1).max())
        idx = torch.argsort((~alive).to(torch.int8), dim=-1, stable=True)[..., :n]  # alive keys first, in order
        k = key.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, key.shape[-1]))
        v = value.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, value.shape[-1]))
        q = torch.arange(q0, q1, device=key.device).view(-1, 1)
        mask = (idx.unsqueeze(-2) <= q) & (q < exp.gather(-1, idx).unsqueeze(-2))  # (B, Hkv, blk, n)
        mask = mask.unsqueeze(2).expand(-1, -1, g, -1, -1).reshape(B, Hkv, g * (q1 - q0), n)
        packed = grouped[:, :, :, q0:q1].reshape(B, Hkv, g * (q1 - q0), D)
        o = sdpa(packed, k, v, mask, scaling, softcap)
        out[:, :, q0:q1] = o.view(B, Hkv, g, q1 - q0, D).reshape(B, Hq, q1 - q0, D)
    return out


AttentionInterface.register(ATTN, masked_attention)
AttentionMaskInterface.register(ATTN, no_mask)
