"""The maths every engine shares: softmax attention over the keys a query may see (KV heads shared
by groups of query heads, Gemma 2's logit cap), the model's own uncompressed attention, which layers
a pass compresses, and the memory a cache holds. No engine state lives here."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from knormpress.errors import ConfigError

BLOCK = 512  # queries per attention block: bounds mask memory at heads x BLOCK x (budget + BLOCK)
UNSUPPORTED = ("s_aux",)  # attention kwargs that change the result and are not implemented here


def cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Attention logit soft-capping (Gemma 2): tanh(scores / cap) * cap, on the scaled scores before
    the mask and the softmax, as transformers' eager attention applies the `softcap` kwarg."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def grouped_weights(query: torch.Tensor, key: torch.Tensor, scaling: float | None, visible: torch.Tensor | None,
                    softcap: float | None = None) -> torch.Tensor:
    """Softmax attention weights (B, Hkv, g, q, n) of query (B, Hq, q, D) over key (B, Hkv, n, D),
    each query head with its KV group (one batched matmul per KV head); `visible` (q, n), or
    (B, Hq or 1, q, n), masks keys out; `softcap` caps the scaled scores first."""
    B, Hq, q, D = query.shape
    Hkv, n = key.shape[1], key.shape[2]
    scale = D**-0.5 if scaling is None else scaling
    grouped = query.reshape(B * Hkv, (Hq // Hkv) * q, D)
    scores = torch.bmm(grouped, key.reshape(B * Hkv, n, D).transpose(1, 2)).view(B, Hkv, Hq // Hkv, q, n) * scale
    scores = cap(scores, softcap)
    if visible is not None:
        if visible.dim() == 4:  # per query head, as SDPA takes it: heads grouped by KV head
            visible = visible.unflatten(1, (Hkv if visible.shape[1] > 1 else 1, -1))
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(dim=-1)


def attend(weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weights (B, Hkv, g, q, n) times value (B, Hkv, n, D) -> (B, Hq, q, D)."""
    B, Hkv, g, q, n = weights.shape
    out = torch.bmm(weights.reshape(B * Hkv, g * q, n), value.reshape(B * Hkv, n, value.shape[-1]))
    return out.view(B, Hkv * g, q, value.shape[-1])


def sdpa(query, key, value, visible: torch.Tensor | None, scaling: float | None, softcap: float | None = None) -> torch.Tensor:
    """torch's SDPA of query (B, Hq, q, D) over key/value (B, Hkv, n, D), KV heads shared by groups of
    queries; `visible` a boolean mask broadcastable to (B, Hq, q, n), None for causal with q == n. SDPA
    has no logit cap, so a capped layer runs the same maths written out (`grouped_weights`)."""
    if softcap is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=visible, is_causal=visible is None,
                                              scale=scaling, enable_gqa=True)
    if visible is None:
        visible = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=key.device).tril()
    return attend(grouped_weights(query, key, scaling, visible, softcap), value)


def plain_attention(query, key, value, scaling=None, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """The model's own uncompressed attention for one sequence: query (B, Hq, T, D) at positions
    0..T-1 over key/value (B, Hkv, T, D) at the same positions, KV heads shared by groups of queries.

    Query q sees key j iff j <= q, and with a sliding window also q - window < j (transformers'
    `sliding_window_overlay`: the query and the window - 1 keys before it). Windowed or capped layers
    run in blocks of BLOCK queries over only the keys they reach. Returns (B, Hq, T, D).
    """
    T = query.shape[2]
    if softcap is None and (window is None or T <= window):
        return sdpa(query, key, value, None, scaling)
    out = torch.empty_like(query)
    for q0 in range(0, T, BLOCK):
        q1, k0 = min(q0 + BLOCK, T), 0 if window is None else max(q0 - window + 1, 0)
        q = torch.arange(q0, q1, device=query.device).view(-1, 1)
        j = torch.arange(k0, q1, device=query.device)
        mask = (j <= q) if window is None else (j <= q) & (j > q - window)
        out[:, :, q0:q1] = sdpa(query[:, :, q0:q1], key[:, :, k0:q1], value[:, :, k0:q1], mask, scaling, softcap)
    return out


def cache_attention(query, key, value, scaling=None, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of a call's q new tokens over a cache of n keys whose last q are their own, in order
    (as a DynamicCache returns them, a sliding layer's window included): query i sees keys
    j <= n - q + i, and with a window only the last `window` of them. Returns (B, Hq, q, D)."""
    q, n = query.shape[2], key.shape[2]
    i = torch.arange(q, device=key.device).view(-1, 1) + (n - q)
    j = torch.arange(n, device=key.device)
    visible = (j <= i) if window is None else (j <= i) & (j > i - window)
    return sdpa(query, key, value, visible, scaling, softcap)


def no_mask(*args, **kwargs) -> None:
    """Engines that mask inside their attention function skip transformers' T x T mask."""
    return None


def compresses(c: Any, layer: int, T: int, window: int | None) -> bool:
    """Whether this layer's cache is ever pruned in a T-token pass: not without a compression, not
    for skipped or sliding-window layers, not when the text never fills the budget plus one interval."""
    return c is not None and window is None and layer not in c.skip_layers and T > c.fix_kv_size + c.interval


def refuse_unsupported(kwargs: dict, engine: str) -> None:
    """Attention features the engines do not implement would silently change the numbers."""
    used = [k for k in UNSUPPORTED if kwargs.get(k) is not None]
    if used:
        raise ConfigError(f"the {engine} engine cannot reproduce attention with {', '.join(used)}; "
                          "use a model without it (e.g. model=smollm2_135m)")


def layer_window(kwargs: dict, layer: int, windows: list[int | None], engine: str) -> int | None:
    """The sliding window this layer attends with (None: full attention), after refusing what the
    engines do not implement: attention features that would silently change the numbers, and a
    window that differs from the one transformers' cache keeps (the held memory would be wrong)."""
    refuse_unsupported(kwargs, engine)
    window = kwargs.get("sliding_window")
    if window != windows[layer]:
        raise ConfigError(f"layer {layer} attends with sliding_window={window} but transformers' cache for this model "
                          f"uses {windows[layer]}; the engines cannot reproduce this model exactly")
    return window


def cache_windows(model: PreTrainedModel) -> list[int | None]:
    """Per layer, the sliding window of the cache layer transformers builds for this model (None: full)."""
    layers = DynamicCache(config=model.config).layers
    return [layer.sliding_window if getattr(layer, "is_sliding", False) else None for layer in layers]


def bytes_per_token(key: torch.Tensor, value: torch.Tensor) -> int:
    """Bytes one token takes in one layer's cache: its key and value in every KV head."""
    return key.shape[1] * (key.shape[-1] * key.element_size() + value.shape[-1] * value.element_size())


def held_uncompressed(T: int, window: int | None = None) -> torch.Tensor:
    """Tokens an uncompressed layer's cache holds when query q = 1..T-1 starts, (T-1,) float64: every
    earlier key, or for a sliding layer the last window - 1 of them (transformers' DynamicSlidingWindowLayer
    keeps no more, as the next query brings the window's last key itself)."""
    held = torch.arange(1, T, dtype=torch.float64)
    return held if window is None else held.clamp(max=window - 1)


def held_now(cache: DynamicCache) -> tuple[float, float]:
    """(tokens per layer and KV head averaged over layers, bytes of keys and values) that `cache`
    holds for one of its batch rows."""
    layers = cache.layers
    rows = layers[0].keys.shape[0]
    return (sum(l.keys.shape[-2] for l in layers) / len(layers),
            sum(l.keys.nbytes + l.values.nbytes for l in layers) / rows)


def held_during_call(cache: DynamicCache, start: int, stop: int) -> list[tuple[float, float]]:
    """(tokens per layer, bytes) `cache` holds when each query after a call that fed tokens
    start..stop-1 starts: inside the call nothing is evicted, so query q+1 would start with q+1
    tokens in a full layer and at most window - 1 in a sliding one (what transformers' sliding
    layer keeps); the last is the cache as the call left it."""
    layers = cache.layers
    lengths = [l.keys.shape[-2] for l in layers]
    per_token = [(l.keys.nbytes + l.values.nbytes) // n for l, n in zip(layers, lengths)]
    limits = [l.sliding_window - 1 if l.is_sliding else None for l in layers]
    rows = []
    for q in range(start, stop - 1):
        held = [q + 1 if limit is None else min(q + 1, limit) for limit in limits]
        rows.append((sum(held) / len(layers), float(sum(h * b for h, b in zip(held, per_token)))))
    return rows + [(sum(lengths) / len(layers), float(sum(n * b for n, b in zip(lengths, per_token))))]
