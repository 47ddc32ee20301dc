"""A token-by-token reference for the eviction strategies, written from the papers' formulas.

It shares no code with knormpress: no `Strategy.score`, `select`, `evict_one`, `expiry`, engine or
cache compressor. The model reads one token per step at its true position into transformers' own
cache, which is never pruned: it holds every key and value the model computed. Eviction is a mask
instead: an attention function written here (softmax of q k^T times the module's scaling, in the
model's dtype, each query head with its KV group) lets query t see key j iff j is in the kept set of
its layer and KV head (or is t itself). Earlier queries never change, so this is the same as
re-reading the prefix under the mask at every step. From each step the reference reads the keys
(after the model's own rotary) and the new query's attention weights of every layer, scores the
tokens of each compressed layer and KV head as the papers define them, and applies the keep rule.

The keep rule (the project's eviction semantics, restated): after token t, a cache holding more
than B tokens keeps the sinks (positions < n_sink), the recent window (positions > t - n_recent,
n_recent = min(floor(keep_ratio * B + 0.5), B - n_sink)) and, of the other tokens, the
B - n_sink - n_recent with the highest score, ties going to the earlier position.

The scores, for the tokens C in the cache of one layer and KV head after token t:
- keep_low (KnormPress): -|k_j|, the float32 norm rounded to 10 significant bits;
- sinks (StreamingLLM): j, so the older slots extend the recent window;
- h2o (H2O): sum over the queries q = j..t and the query heads of the group of A[q, j]; with
  normalise="mean" divided by t + 1 - j, the number of those queries;
- tova (TOVA): A[t, j] averaged over all query heads of the layer;
- keydiff (KeyDiff): -cos(k_j, a) with a = mean over C of k_i / |k_i|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

NAME = "knorm_test_reference"
METHODS = ("keep_low", "sinks", "h2o", "h2o_mean", "tova", "keydiff")


@dataclass
class Method:
    """What the reference evaluates: a method of METHODS and its budget."""

    method: str
    budget: int
    keep_ratio: float
    n_sink: int = 0
    skip_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        assert self.method in METHODS, self.method

    @property
    def n_recent(self) -> int:
        return min(math.floor(self.keep_ratio * self.budget + 0.5), self.budget - self.n_sink)


@dataclass
class Reference:
    """What the reference computed: nll[t] of token t + 1 given 0..t, and after each step t, per layer,
    the kept positions of each KV head (uncompressed layers: every position)."""

    nll: list[float] = field(default_factory=list)
    kept: list[list[list[list[int]]]] = field(default_factory=list)  # [step][layer][kv head] -> positions


@dataclass
class _Step:
    """The model call that reads token t: which keys each layer's KV heads may show it, and what it saw."""

    t: int
    sees: torch.Tensor  # (layers, kv heads, T) bool, the kept set plus t
    weights: torch.Tensor  # (layers, q heads, T, T): row q = query q's attention, filled as the queries are read
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (kv heads, t + 1, D) after rotary


_NOW: list[_Step] = []


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(q k^T * scaling) v for the one new query, which sees key j iff sees[layer, its KV head, j]."""
    step = _NOW[-1]
    layer, n = module.layer_idx, key.shape[2]
    group = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = (query @ k.transpose(-1, -2)) * scale  # (1, q heads, 1, n)
    allowed = step.sees[layer, :, :n].repeat_interleave(group, dim=0)[None, :, None]
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    step.weights[layer, :, step.t, :n] = weights[0, :, 0]
    step.keys[layer] = key[0]
    return (weights @ v).transpose(1, 2).contiguous(), weights


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, lambda *args, **kwargs: None)


def round_bits(x: float, bits: int = 10) -> float:
    """x rounded to `bits` significant bits (mantissa in [0.5, 1), halves to even)."""
    mantissa, exponent = math.frexp(x)
    return math.ldexp(round(mantissa * 2**bits) / 2**bits, exponent)


def scores(m: Method, cache: list[int], t: int, keys: torch.Tensor, weights: torch.Tensor, head: int,
           group: int) -> dict[int, float]:
    """Score of every cached position j of one layer and KV head after token t.
    keys: (kv heads, t + 1, D); weights: (q heads, t + 1, t + 1), rows = queries 0..t."""
    if m.method == "keep_low":
        return {j: -round_bits(float(keys[head, j].float().norm())) for j in cache}
    if m.method == "sinks":
        return {j: float(j) for j in cache}
    if m.method in ("h2o", "h2o_mean"):
        received = weights[head * group:(head + 1) * group].sum(dim=(0, 1))  # over the group's heads and queries 0..t
        per = (lambda j: t + 1 - j) if m.method == "h2o_mean" else (lambda j: 1)
        return {j: float(received[j]) / per(j) for j in cache}
    if m.method == "tova":
        now = weights[:, t].mean(dim=0)
        return {j: float(now[j]) for j in cache}
    if m.method == "keydiff":
        k = {j: keys[head, j] for j in cache}
        anchor = sum(v / v.norm() for v in k.values()) / len(cache)
        return {j: -float(v @ anchor / (v.norm() * anchor.norm())) for j, v in k.items()}


def keep(m: Method, cache: list[int], score: dict[int, float], t: int) -> list[int]:
    """The keep rule of the module docstring."""
    if len(cache) <= m.budget:
        return cache
    forced = [j for j in cache if j < m.n_sink or j > t - m.n_recent]
    older = sorted((j for j in cache if j not in forced), key=lambda j: (-score[j], j))
    return sorted(forced + older[: m.budget - len(forced)])


@torch.no_grad()
def reference(model, ids: torch.Tensor, m: Method) -> Reference:
    """Read ids (T,) token by token under `m`: NLL of tokens 1..T-1 and the kept positions after steps 0..T-2."""
    config = model.config
    T, L = ids.shape[0], config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    group = config.num_attention_heads // kv_heads
    weights = torch.zeros(L, config.num_attention_heads, T, T, dtype=model.dtype)
    kept = [[[] for _ in range(kv_heads)] for _ in range(L)]
    everything = DynamicCache(config=config)  # every token's key and value, never pruned
    out = Reference()
    previous = config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        for t in range(T - 1):
            sees = torch.zeros(L, kv_heads, T, dtype=torch.bool)
            for layer in range(L):
                for h in range(kv_heads):
                    kept[layer][h] = kept[layer][h] + [t]
                    sees[layer, h, kept[layer][h]] = True
            _NOW.append(_Step(t, sees, weights))
            logits = model(input_ids=ids[None, t:t + 1], position_ids=torch.tensor([[t]]), cache=everything,
                           use_cache=True).logits
            step = _NOW.pop()
            out.nll.append(float(F.cross_entropy(logits[0, -1].double(), ids[t + 1])))
            for layer in range(L):
                if layer in m.skip_layers:
                    continue
                for h in range(kv_heads):
                    score = scores(m, kept[layer][h], t, step.keys[layer], weights[layer, :, : t + 1, : t + 1], h, group)
                    kept[layer][h] = keep(m, kept[layer][h], score, t)
            out.kept.append([[list(c) for c in heads] for heads in kept])
    finally:
        model.set_attn_implementation(previous)
    return out
