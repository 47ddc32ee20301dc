"""positions=rerotate without the token loop: static strategies with the cache in time order.

A static score never changes once a key exists (under rerotate it is the key's score at its true
position, `CacheCompressor`), so the evictions do not depend on the rotations: each key's expiry
(`knormpress.eviction.expiry`, the masked engine's) is the same as under true positions. What
rerotate changes is the logit. In a cache kept in time order a kept key's index is the number of
cached tokens before it, so query t (at index n_t) sees key p (at index i) at the distance
n_t - i = (t - p) - D(t, p), where D(t, p) counts the tokens between them that were evicted by
then: D(t, p) = #{e : p < e < t, expiry(e) <= t}. Rotations compose (R(a) R(b) = R(a + b),
`knormpress.rotary`), so with q_t and k_p as the model rotated them at their true positions

    logit(t, p) = q_t . R(D(t, p)) k_p

the key moved forward by D(t, p), which is zero inside the recent window. Per block of L queries
starting at t0, D(t, p) = D(t0, p) + d(t, p) with 0 <= d(t, p) <= the evictions inside the block:
the keys are rotated once by D(t0, p), each query is rotated back by every d that occurs
(q . R(d) k = (R(-d) q) . k), one batched matmul gives every (d, query, key) logit, and each pair
reads its own d. No step loop, no key moved one index at a time; in exact arithmetic the same
logits and the same final cache as the token-by-token engine (the float64 tests).
"""

from __future__ import annotations

import torch

from knormpress.engines.maths import cap, sdpa
from knormpress.rotary import Rotary
from knormpress.strategies import CacheView, Strategy

BLOCK = 16  # queries per block: each pair reads one of (evictions in the block + 1) rotated queries


def static_scores(key: torch.Tensor, strategy: Strategy, layer: int) -> torch.Tensor:
    """(1, Hkv, T) a static strategy's score of every key at its true position, where the model computed
    it (the token-by-token engine scores the keys it re-rotated after rotating them back there)."""
    return strategy.score(CacheView(key, torch.arange(key.shape[2], device=key.device).expand(key.shape[:3]), layer))


def rerotated_attention(query, key, value, exp: torch.Tensor, budget: int, rotary: Rotary, layer: int,
                        scaling: float | None, softcap: float | None = None) -> torch.Tensor:
    """Attention of query (1, Hq, T, D) over key/value (1, Hkv, T, D) under positions=rerotate, for the
    expiries exp (1, Hkv, T) of a static strategy kept in time order. Returns (1, Hq, T, D)."""
    _, Hq, T, D = query.shape
    Hkv = key.shape[1]
    g = Hq // Hkv
    out = torch.empty_like(query)
    head = budget + 1  # queries 0..budget see every earlier key at its true distance
    out[:, :, :head] = sdpa(query[:, :, :head], key[:, :, :head], value[:, :, :head], None, scaling, softcap)
    scale = D**-0.5 if scaling is None else scaling
    grouped = (query[0] * scale).view(Hkv, g, T, D)
    keys_at = torch.arange(T, device=key.device)
    # evictions in the order they happen; every pruning evicts as many tokens from each head
    when, which = exp[0].sort(dim=-1, stable=True)
    evicted = torch.zeros(Hkv, T, dtype=torch.int32, device=key.device)  # expired by the block's first query
    done = 0
    q0 = head
    while q0 < T:
        q1 = min(q0 + BLOCK, T)
        first, last = torch.searchsorted(when[0], torch.tensor([q0, q1 - 1], device=key.device), right=True).tolist()
        if last - first > BLOCK:  # a long interval prunes many at once: end the block before that pruning
            q1, last = int(when[0, first]), first
        t = torch.arange(q0, q1, device=key.device)
        evicted.scatter_(1, which[:, done:first], 1)
        done = first
        alive = (exp[0] > q0) & (keys_at < q1)  # as many in every head: each holds as many keys at each query
        idx = alive.nonzero()[:, 1].view(Hkv, -1)  # (Hkv, n) in time order
        n = idx.shape[1]
        start = first - evicted.cumsum(-1).gather(-1, idx)  # D(q0, p): tokens after p expired by q0
        k = key[0].gather(1, idx.unsqueeze(-1).expand(-1, -1, D))
        moved = int((start > 0).sum(-1).max())  # keys after every eviction so far stay where the model put them
        k = torch.cat([rotary.shift(k[:, :moved], start[:, :moved], layer, once=True), k[:, moved:]], dim=1)
        v = value[0].gather(1, idx.unsqueeze(-1).expand(-1, -1, value.shape[-1]))
        q, L = grouped[:, :, q0:q1], q1 - q0  # (Hkv, g, L, D)
        logits = torch.bmm(q.reshape(Hkv, g * L, D), k.transpose(1, 2)).view(Hkv, g, L, n)  # d = 0
        if last > first:  # evictions inside the block: the keys before the last of them need d(t, p)
            ev_when, ev_which = when[:, first:last], which[:, first:last]  # (Hkv, m)
            split = int((idx <= ev_which.max(dim=-1, keepdim=True).values).sum(-1).max())
            by_query = (ev_when.unsqueeze(1) <= t.view(1, -1, 1)).to(q.dtype)  # (Hkv, L, m)
            after_key = (ev_which.unsqueeze(-1) > idx[:, :split].unsqueeze(1)).to(q.dtype)  # (Hkv, m, split)
            extra = torch.bmm(by_query, after_key).long()  # (Hkv, L, split): d(t, p)
            versions = last - first + 1  # each query rotated back by 0 .. m
            back = -torch.arange(versions, device=key.device).view(versions, 1, 1, 1)
            turned = rotary.shift(q.unsqueeze(0), back, layer, once=True).transpose(0, 1)  # (Hkv, versions, g, L, D)
            older = torch.bmm(turned.reshape(Hkv, versions * g * L, D), k[:, :split].transpose(1, 2))
            older = older.view(Hkv, versions, g, L, split).gather(1, extra[:, None, None].expand(-1, 1, g, -1, -1))
            logits[..., :split] = older.squeeze(1)
        visible = (idx.unsqueeze(-2) <= t.view(-1, 1)) & (t.view(-1, 1) < exp[0].gather(-1, idx).unsqueeze(-2))
        logits = cap(logits, softcap).masked_fill(~visible.unsqueeze(1), float("-inf"))
        o = torch.bmm(logits.softmax(dim=-1).view(Hkv, g * L, n), v)
        out[0, :, q0:q1] = o.view(Hq, L, -1)
        q0 = q1
    return out


def rerotated_kept(key, value, exp: torch.Tensor, rotary: Rotary, layer: int) -> tuple[torch.Tensor, ...]:
    """(keys, values, positions, None) the token-by-token cache holds after token T-2: the keys query
    T-1 still sees, in time order, each rotated from its true position to its index."""
    T = key.shape[2]
    alive = (exp > T - 1) & (torch.arange(T, device=key.device) < T - 1)
    positions = alive.nonzero()[:, -1].view(1, key.shape[1], -1)  # every head holds as many
    index = torch.arange(positions.shape[-1], device=key.device)
    keys = rotary.shift(key.gather(2, positions.unsqueeze(-1).expand(-1, -1, -1, key.shape[-1])), index - positions, layer)
    values = value.gather(2, positions.unsqueeze(-1).expand(-1, -1, -1, value.shape[-1]))
    return keys, values, positions, None
