"""Attention functions the engines register in transformers, and how an engine switches to one.

An engine sets a plan (what this pass compresses, what to record) in a context variable and
switches the model to its registered attention implementation for the duration of one call, so
any architecture that dispatches through transformers' attention interface works unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from knormpress.errors import ConfigError
from knormpress.rotary import Rotary

PLAN: ContextVar[Any] = ContextVar("knorm_plan", default=None)
BLOCK = 512  # queries per attention block: bounds mask memory at heads x BLOCK x (budget + BLOCK)


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str, plan: Any) -> Iterator[Any]:
    """Run the model with the attention registered as `name`, which reads `plan` from PLAN."""
    previous = model.config._attn_implementation
    token = PLAN.set(plan)
    model.set_attn_implementation(name)
    try:
        yield plan
    finally:
        model.set_attn_implementation(previous)
        PLAN.reset(token)


@dataclass
class OnePassPlan:
    """What a one-pass engine's attention function reads (the compression, each layer's window) and
    fills (`held`: layer -> (tokens held when each query starts, bytes per token))."""

    compression: Any
    windows: list[int | None]  # per layer: the window of a sliding layer in transformers' cache, else None
    held: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)


def one_pass(model: PreTrainedModel, input_ids: torch.Tensor, name: str, plan: Any) -> tuple[torch.Tensor, ...]:
    """One forward pass over (1, T) with the attention registered as `name`, which fills
    `plan.held` (layer -> (tokens held per query, bytes per token)). Returns logits (T, vocab), the
    tokens held per layer and KV head averaged over layers (T-1,), and the bytes held (T-1,)."""
    with attention_implementation(model, name, plan):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        logits = model(input_ids=input_ids, position_ids=positions, use_cache=False).logits[0]
    tokens = torch.stack([t for t, _ in plan.held.values()])
    return logits, tokens.mean(0), sum(t * b for t, b in plan.held.values())


def no_mask(*args, **kwargs) -> None:
    """Engines that mask inside their attention function skip transformers' T x T mask."""
    return None


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


def attend(weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weights (B, Hkv, g, q, n) times value (B, Hkv, n, D) -> (B, Hq, q, D)."""
    B, Hkv, g, q, n = weights.shape
    out = torch.bmm(weights.reshape(B * Hkv, g * q, n), value.reshape(B * Hkv, n, value.shape[-1]))
    return out.view(B, Hkv * g, q, value.shape[-1])


UNSUPPORTED = ("s_aux",)  # attention kwargs that change the result and are not implemented here


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


def compresses(c: Any, layer: int, T: int, window: int | None) -> bool:
    """Whether this layer's cache is ever pruned in a T-token pass: not without a compression, not
    for skipped or sliding-window layers, not when the text never fills the budget plus one interval."""
    return c is not None and window is None and layer not in c.skip_layers and T > c.fix_kv_size + c.interval


def bytes_per_token(key: torch.Tensor, value: torch.Tensor) -> int:
    """Bytes one token takes in one layer's cache: its key and value in every KV head."""
    return key.shape[1] * (key.shape[-1] * key.element_size() + value.shape[-1] * value.element_size())


def held_uncompressed(T: int, window: int | None = None) -> torch.Tensor:
    """Tokens an uncompressed layer's cache holds when query q = 1..T-1 starts, (T-1,) float64: every
    earlier key, or for a sliding layer the last window - 1 of them (transformers' DynamicSlidingWindowLayer
    keeps no more, as the next query brings the window's last key itself)."""
    held = torch.arange(1, T, dtype=torch.float64)
    return held if window is None else held.clamp(max=window - 1)


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


RECORD = "knorm_record"


def shift_new_tokens(rotary: Rotary, query: torch.Tensor, key: torch.Tensor, start: int, layer: int) -> torch.Tensor:
    """positions=rerotate, token by token: the call's q tokens arrive rotated at their true positions
    start.., but the layer's cache holds n - q earlier keys at indices 0..n-q-1, so they belong at
    n-q..n-1. Rotates the new keys in place (`key` is the cache layer's own tensor) and returns the
    query, both moved by n - q - start."""
    q, n = query.shape[2], key.shape[2]
    delta = n - q - start
    if delta == 0:
        return query
    key[:, :, n - q:] = rotary.shift(key[:, :, n - q:], delta, layer)
    return rotary.shift(query, delta, layer)


def recording_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Exact attention for the token-by-token engine that puts new tokens at their slots under
    positions=rerotate and records, per compressed layer, what attention-based strategies score
    from: the last query's weights (B, Hq, n) and the weights summed over the call's queries and
    each KV group (B, Hkv, n). The cache holds n - q earlier tokens, then this call's q tokens in
    order, so query i sees keys 0 .. n - q + i. Every layer's output is the model's own attention
    (transformers' SDPA path, or `cache_attention` where the layer caps its logits, which SDPA
    cannot), so token by token the logits are those of the uncompressed model's code on the kept
    cache; the recorded weights are computed beside it."""
    plan = PLAN.get()
    layer, window, softcap = module.layer_idx, kwargs.get("sliding_window"), kwargs.get("softcap")
    refuse_unsupported(kwargs, "streaming")
    compressed = layer not in plan.compression.skip_layers and window is None
    if compressed and plan.rotary is not None:
        query = shift_new_tokens(plan.rotary, query, key, plan.start, layer)
    if softcap is None:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    else:
        out = cache_attention(query, key, value, scaling, window, softcap).transpose(1, 2), None
    if compressed and plan.record:  # the weights are recorded beside the model's own output, not used for it
        q, n = query.shape[2], key.shape[2]
        visible = torch.arange(n, device=key.device) <= (n - q) + torch.arange(q, device=key.device).view(-1, 1)
        w = grouped_weights(query, key, scaling, visible, softcap)
        plan.recorded[layer] = (w[..., -1, :].flatten(1, 2), w.sum(dim=(2, 3)))
    return out


AttentionInterface.register(RECORD, recording_attention)
AttentionMaskInterface.register(RECORD, sdpa_mask)  # the layers handed to SDPA get exactly its mask


PROMPT = "knorm_prompt"
PROMPT_BLOCK = 256  # queries per block of the recorded weights: no T x T matrix is ever held


def prompt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Transformers' own SDPA attention over a whole prompt read uncompressed (outputs unchanged),
    recording per full-attention layer what attention-based strategies prune from: the last query's
    weights (B, Hq, T) and the weights summed over all queries and each KV group (B, Hkv, T)."""
    refuse_unsupported(kwargs, "prefill")  # the outputs and recorded weights would not be the model's
    softcap = kwargs.get("softcap")
    if softcap is None:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    else:  # one unpadded prompt from position 0: causal, within the layer's window
        out = plain_attention(query, key, value, scaling, kwargs.get("sliding_window"), softcap).transpose(1, 2), None
    if kwargs.get("sliding_window") is None:
        T = key.shape[2]
        total = torch.zeros(key.shape[:3], dtype=torch.float32, device=key.device)
        for start in range(0, T, PROMPT_BLOCK):
            stop = min(start + PROMPT_BLOCK, T)
            visible = torch.arange(stop, device=key.device) <= torch.arange(start, stop, device=key.device).view(-1, 1)
            w = grouped_weights(query[:, :, start:stop], key[:, :, :stop], scaling, visible, softcap)
            total[..., :stop] += w.sum(dim=(2, 3))
        PLAN.get().recorded[module.layer_idx] = (w[..., -1, :].flatten(1, 2).clone(), total)  # not a view of the block
    return out


AttentionInterface.register(PROMPT, prompt_attention)
AttentionMaskInterface.register(PROMPT, sdpa_mask)
