"""The streaming engine against references that share no code with it, in float64.

`tests/reference.py` reads a text token by token from the papers' formulas (no cache, the model's own
projections and rotary, an attention function and keep rule of its own): the streaming engine must
keep the same positions after every step, in every layer and KV head, and give the same NLL, for
keep_low, sinks, h2o (both normalisations), tova and keydiff. The one-pass engines equal the
streaming one (tests/test_engines_replay.py), so they are held to the same reference.

positions=rerotate is checked from the model's side: every key the streaming cache holds must be the
model's own rotary at its slot applied to the key as projected (captured before rotary), and a new
query must be rotated at the layer's length (the slot its key takes).
"""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F

import knormpress.engines.streaming as streaming
from knormpress import Compression, run_engine
from knormpress.compression import CacheCompressor

from conftest import VOCAB, state_of, tiny_model
from reference import Method, reference

NODES = {"keep_low": "keep_low", "sinks": "sinks", "h2o": "h2o", "h2o_mean": {"name": "h2o", "normalise": "mean"},
         "tova": "tova", "keydiff": "keydiff"}
# (arch, method, budget, keep_ratio, n_sink, skip layers): every method on both tiny models between them,
# with and without a recent window, sinks and skipped layers
FAST = [("llama", "keep_low", 16, 0.5, 0, (0,)), ("gpt_neox", "keep_low", 12, 0.0, 0, ()),
        ("llama", "sinks", 16, 0.25, 2, ()), ("gpt_neox", "h2o", 16, 0.5, 0, (1,)), ("llama", "h2o", 12, 0.25, 2, ()),
        ("llama", "h2o_mean", 16, 0.0, 0, ()), ("gpt_neox", "h2o_mean", 12, 0.5, 2, ()),
        ("llama", "tova", 16, 0.0, 0, ()), ("gpt_neox", "tova", 12, 0.5, 0, (0,)),
        ("llama", "keydiff", 16, 0.0, 0, ()), ("gpt_neox", "keydiff", 12, 0.25, 2, ())]


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch).double() for arch in ("gpt_neox", "llama")}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (56,), generator=torch.Generator().manual_seed(11))


def streaming_run(model, ids, c: Compression, monkeypatch):
    """The streaming engine's output and, per step it compressed after, [layer][kv head] -> kept positions."""
    kept: dict[int, list[list[list[int]]]] = {}

    class Recorder(CacheCompressor):
        def __call__(self, cache, attention=None):
            super().__call__(cache, attention)
            layers, steps = [], set()
            for i, layer in enumerate(cache.layers):
                state, n = state_of(cache, i), layer.keys.shape[-2]
                if state.positions is None:  # never pruned: every token read so far
                    layers.append([list(range(n))] * layer.keys.shape[1])
                    steps.add(n - 1)
                else:
                    layers.append([sorted(p) for p in state.positions[0].tolist()])
                    steps.add(state.length - 1)
            assert len(steps) == 1
            kept[steps.pop()] = layers
            return cache

    monkeypatch.setattr(streaming, "CacheCompressor", Recorder)
    return run_engine(model, ids, c, "streaming"), kept


def check(model, ids, method, budget, keep_ratio, n_sink, skip, monkeypatch):
    c = Compression(NODES[method], budget, keep_ratio, list(skip), n_sink=n_sink)
    out, kept = streaming_run(model, ids, c, monkeypatch)
    ref = reference(model, ids, Method(method, budget, keep_ratio, n_sink, skip))
    assert min(kept) == budget - 1 and max(kept) == len(ids) - 2  # the prefill call, then every step
    for step, layers in kept.items():
        assert layers == ref.kept[step], f"step {step}"
    nll = F.cross_entropy(out.logits.double(), ids[1:], reduction="none")
    assert torch.allclose(nll, torch.tensor(ref.nll, dtype=torch.float64), atol=1e-5)
    # a control: the method decided something, i.e. it did not just keep the newest tokens everywhere
    newest = [list(range(len(ids) - 1 - budget, len(ids) - 1))]
    assert any(heads != newest * len(heads) for i, heads in enumerate(ref.kept[-1]) if i not in skip)


@pytest.mark.parametrize("arch,method,budget,keep_ratio,n_sink,skip", FAST)
def test_streaming_keeps_what_the_papers_formulas_keep(models, ids, arch, method, budget, keep_ratio, n_sink, skip,
                                                       monkeypatch):
    check(models[arch], ids, method, budget, keep_ratio, n_sink, skip, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("method,keep_ratio", [("h2o", 0.5), ("tova", 0.0), ("keydiff", 0.0)])
def test_streaming_keeps_what_the_papers_formulas_keep_on_smollm2(smollm2, gutenberg_ids, method, keep_ratio,
                                                                  monkeypatch):
    model = copy.deepcopy(smollm2.model).double()
    check(model, gutenberg_ids[:192], method, 64, keep_ratio, 0, (), monkeypatch)  # 127 steps evict


class Projected:
    """Keys and queries as each layer projects them, before rotary: per layer, one (heads, n, D) per model call."""

    def __init__(self, model) -> None:
        self.keys: dict[int, list[torch.Tensor]] = {}
        self.queries: dict[int, list[torch.Tensor]] = {}
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.handles = []
        for i, layer in enumerate(model.base_model.layers):
            if hasattr(layer, "self_attn"):  # llama: q_proj, k_proj
                self.handles.append(layer.self_attn.q_proj.register_forward_hook(self._take(i, self.queries, self.heads)))
                self.handles.append(layer.self_attn.k_proj.register_forward_hook(self._take(i, self.keys, self.kv_heads)))
            else:  # gpt_neox: one fused projection, per head [q | k | v]
                self.handles.append(layer.attention.query_key_value.register_forward_hook(self._fused(i)))

    def _take(self, layer, into, heads):
        def hook(module, args, out):
            into.setdefault(layer, []).append(out.view(out.shape[0], out.shape[1], heads, -1).transpose(1, 2)[0])
        return hook

    def _fused(self, layer):
        def hook(module, args, out):
            q, k, _ = out.view(out.shape[0], out.shape[1], self.heads, -1).transpose(1, 2)[0].chunk(3, dim=-1)
            self.queries.setdefault(layer, []).append(q)
            self.keys.setdefault(layer, []).append(k)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal vectors (last dim) up to 1e-5 of their length: the model's rotary computes its angles in float32
    even in a float64 model, so a key rotated at p and moved by s - p differs from one rotated at s by ~1e-7
    of its length; a key one slot off differs by about its whole length in the fast-turning dimensions."""
    return bool(((a - b).norm(dim=-1) <= 1e-5 * b.norm(dim=-1)).all())


def rotated(model, x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """x (H, n, D) rotated at positions `at` (n,) by the model's own rotary embedding and apply_rotary_pos_emb."""
    cos, sin = model.base_model.rotary_emb(x[None], at[None])
    apply = sys.modules[type(model).__module__].apply_rotary_pos_emb
    return apply(x[None], x[None], cos, sin)[0][0]


@pytest.mark.parametrize("arch,interval", [("llama", 1), ("gpt_neox", 3)])
def test_rerotate_puts_every_key_at_its_slot_and_each_new_query_at_the_layers_length(models, ids, arch, interval,
                                                                                     monkeypatch):
    model, T, B = models[arch], 40, 12
    c = Compression("keep_low", B, 0.5, [0], positions="rerotate", interval=interval)
    projected = Projected(model)
    caches, queries = [], {}

    class Recorder(CacheCompressor):
        def __call__(self, cache, attention=None):
            super().__call__(cache, attention)
            states = [state_of(cache, i) for i in range(len(cache.layers))]
            caches.append([(l.keys[0].clone(), s.positions, s.length) for l, s in zip(cache.layers, states)])
            return cache

    def sdpa(module, query, key, *args, **kwargs):  # the query and keys the engine's attention hands to SDPA
        queries.setdefault(module.layer_idx, []).append((query[0, :, -1].clone(), key.shape[2]))
        return sdpa_forward(module, query, key, *args, **kwargs)

    sdpa_forward = streaming.sdpa_attention_forward
    monkeypatch.setattr(streaming, "CacheCompressor", Recorder)
    monkeypatch.setattr(streaming, "sdpa_attention_forward", sdpa)
    try:
        run_engine(model, ids[:T], c, "streaming")
    finally:
        projected.remove()
    raw_keys = {i: torch.cat(k, dim=1) for i, k in projected.keys.items()}  # (kv heads, T - 1, D) by true position
    moved = 0
    for layers in caches:
        for i, (keys, kept, length) in enumerate(layers):
            n, m = keys.shape[1], 0 if kept is None else kept.shape[-1]
            # slots 0..n-1 hold the tokens kept by the last pruning, then the ones appended since, in order
            appended = torch.arange(length, length + n - m).expand(keys.shape[0], -1)
            positions = appended if kept is None else torch.cat([kept[0], appended], dim=-1)
            raw = raw_keys[i].gather(1, positions[..., None].expand(-1, -1, keys.shape[-1]))
            assert close(keys, rotated(model, raw, torch.arange(n))), f"layer {i}"
            moved += int((positions != torch.arange(n)).sum())
    assert moved > 0
    shifted = 0
    for layer, calls in queries.items():  # the prefill call, then one token per call
        true = -1
        for (query, n), raw in zip(calls, projected.queries[layer], strict=True):
            true += raw.shape[1]  # the true position of the call's last token
            assert close(query, rotated(model, raw[:, -1:], torch.tensor([n - 1]))[:, 0]), layer
            shifted += n - 1 != true
    assert sorted(queries) == [0, 1, 2, 3] and shifted > 0
