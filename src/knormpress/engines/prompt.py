"""Read prompts under a compression, then decode greedily from the compressed cache.

`Compression.when` picks the protocol:

- prefill: each prompt is read whole, uncompressed, and the cache is pruned once to the budget
  (the KnormPress paper's passkey and needle protocol, kvpress' default). That uncompressed pass is
  the same for every strategy and budget, so it is computed once per model and prompt and stored on
  disk under the cache dir (`STORE`), where every later job, in this process or another, reads it
  memory-mapped: a sweep shares it, and memory holds one prompt's pass at a time, not all of them;
- streaming: the cache never exceeds the budget while the prompt is read: the fastest exact engine
  that ends with the compressed cache (`Engine.builds_cache`; replay, or streaming for strategies
  replay cannot reproduce).

Decoding then goes on token by token from that cache under the same compression, through the
streaming engine's `CacheReader`, with explicit positions (transformers would otherwise take them
from the pruned cache's length). Prompts of one call share their length, so they decode in batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from knormpress.compression import CacheCompressor, Compression, LayerState, build_cache, cache_state
from knormpress.engines.base import PLAN, attention_implementation, plan_of
from knormpress.engines.maths import grouped_weights, held_now, plain_attention, refuse_unsupported
from knormpress.engines.run import pick_engine, run_engine
from knormpress.engines.streaming import CacheReader
from knormpress.errors import ConfigError
from knormpress.sources.cache import cache_dir, lock

ATTN = "knorm_prompt"
BLOCK = 256  # queries per block of the recorded weights: no T x T matrix is ever held
STORE = "prompt_passes"  # the uncompressed passes, under the cache dir: <model fingerprint>/<prompt hash>.pt
FORMAT = 1  # part of the store's key: raise it when what a pass records, or how, changes
BATCH = 5  # prompts decoded together: the uncompressed baseline holds every one's full cache


@dataclass
class Pass:
    """One prompt read uncompressed: per layer (keys, values), the logits after its last token and,
    per full-attention layer, the last query's weights and the weights summed over all queries
    (what attention-based strategies prune from)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor
    attention: dict[int, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


def prompt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Transformers' own SDPA attention over a whole prompt read uncompressed (outputs unchanged),
    recording into the plan (layer -> weights), per full-attention layer, what attention-based
    strategies prune from: the last query's weights (B, Hq, T) and the weights summed over all
    queries and each KV group (B, Hkv, T)."""
    recorded = plan_of(kwargs, dict, ATTN)
    refuse_unsupported(kwargs, "prefill")  # the outputs and recorded weights would not be the model's
    softcap = kwargs.get("softcap")
    if softcap is None:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    else:  # one unpadded prompt from position 0: causal, within the layer's window
        out = plain_attention(query, key, value, scaling, kwargs.get("sliding_window"), softcap).transpose(1, 2), None
    if kwargs.get("sliding_window") is None:
        T = key.shape[2]
        total = torch.zeros(key.shape[:3], dtype=torch.float32, device=key.device)
        for start in range(0, T, BLOCK):
            stop = min(start + BLOCK, T)
            visible = torch.arange(stop, device=key.device) <= torch.arange(start, stop, device=key.device).view(-1, 1)
            w = grouped_weights(query[:, :, start:stop], key[:, :, :stop], scaling, visible, softcap)
            total[..., :stop] += w.sum(dim=(2, 3))
        recorded[module.layer_idx] = (w[..., -1, :].flatten(1, 2).clone(), total)  # not a view of the block
    return out


AttentionInterface.register(ATTN, prompt_attention)
AttentionMaskInterface.register(ATTN, sdpa_mask)


def _fingerprint(model: PreTrainedModel) -> str:
    """Identity of a model's numbers across reloads and processes (each Hydra job loads its own copy),
    with the library versions that compute them and the store's format."""
    digest = hashlib.sha256(model.config.to_json_string().encode() + str((model.dtype, model.device)).encode())
    digest.update(f"{torch.__version__} {transformers.__version__} {FORMAT}".encode())
    for p in (next(model.parameters()), model.get_output_embeddings().weight):
        digest.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def stored_path(model: PreTrainedModel, ids: torch.Tensor) -> Path:
    """Where the uncompressed pass of prompt `ids` through `model` is stored."""
    return cache_dir() / STORE / _fingerprint(model)[:24] / f"{hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:32]}.pt"


def uncompressed_pass(model: PreTrainedModel, ids: torch.Tensor) -> Pass:
    """The uncompressed pass over prompt `ids` (T,): read memory-mapped from the store when any job
    computed it before, else computed and stored (one process computes it, the others wait)."""
    path = stored_path(model, ids)
    if not path.exists():
        with lock(path):
            if not path.exists():
                part = path.with_suffix(".part")
                found = _read(model, ids)
                torch.save({"layers": found.layers, "logits": found.logits, "attention": found.attention}, part)
                part.replace(path)
    p = torch.load(path, mmap=True, weights_only=True, map_location=model.device)
    return Pass([tuple(layer) for layer in p["layers"]], p["logits"], p["attention"])


@torch.no_grad()
def _read(model: PreTrainedModel, ids: torch.Tensor) -> Pass:
    """Prompt `ids` (T,) read uncompressed: only the last position's logits are computed."""
    T, recorded = ids.shape[0], {}
    with attention_implementation(model, ATTN):
        out = model(input_ids=ids.view(1, T).to(model.device), position_ids=torch.arange(T, device=model.device)[None],
                    cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1, **{PLAN: recorded})
    return Pass([(l.keys, l.values) for l in out.cache.layers], out.logits[0, -1].float(), recorded)


def prompt_cache(model: PreTrainedModel, ids: torch.Tensor, compression: Compression | None, engine: str = "auto"
                 ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read one prompt `ids` (T,) under `compression` (budget in tokens; None: uncompressed).
    Returns the cache after the prompt, the logits (vocab,) for the first answer token, and the
    tokens (per layer and KV head, mean over layers) and bytes held when queries 1..T-1 start.
    `engine` (streaming protocol only): auto = replay, or streaming where replay is not exact."""
    T = ids.shape[0]
    if compression is not None and compression.when == "streaming":
        engine = prompt_engine(compression, engine, model)
        out = run_engine(model, torch.cat([ids, ids[-1:]]), compression, engine)  # the extra token is never read
        # a copy of the last row: a view would keep every position's logits (T x vocab) alive with it
        return out.cache, out.logits[-1].clone(), out.kv_tokens[: T - 1], out.kv_bytes[: T - 1]
    p = uncompressed_pass(model, ids)
    cache = build_cache(model.config, ((keys, values, None) for keys, values in p.layers))
    if compression is not None:
        CacheCompressor(compression)(cache, p.attention if compression.strategy.needs_attention else None)
    seen = torch.arange(1, T, dtype=torch.float64)
    return cache, p.logits, seen, seen * (p.nbytes / T)


def prompt_engine(compression: Compression | None, engine: str = "auto", model: PreTrainedModel | None = None) -> str:
    """What reads the prompt: "prefill" (uncompressed pass, pruned once) or the engine `engine` names
    (auto: the fastest) that reproduces the compression and ends with the compressed cache."""
    if compression is None or compression.when == "prefill":
        return "prefill"
    return pick_engine(engine, compression, model, cache=True).name


def _read_batch(model: PreTrainedModel, prompts: torch.Tensor, c: Compression | None, engine: str
                ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts (n, T) of one length read one after another into one batch cache, each prompt's own
    cache copied into its row and dropped at once (never all of them and the batch together); with
    the logits (n, vocab) for the first answer tokens and the first prompt's tokens and bytes held."""
    n, keys, values, states, logits = prompts.shape[0], [], [], [], []
    for i, row in enumerate(prompts):
        cache, first, tokens, nbytes = prompt_cache(model, row, c, engine)
        if i == 0:
            held = tokens, nbytes
            keys = [l.keys.new_empty((n, *l.keys.shape[1:])) for l in cache.layers]
            values = [l.values.new_empty((n, *l.values.shape[1:])) for l in cache.layers]
        for idx, layer in enumerate(cache.layers):
            keys[idx][i], values[idx][i] = layer.keys[0], layer.values[0]
        states.append(cache_state(cache))
        logits.append(first)
    batch = build_cache(model.config, (
        (k, v, LayerState.stacked([s[idx] for s in states]) if idx in states[0] else None)
        for idx, (k, v) in enumerate(zip(keys, values))))
    return batch, torch.stack(logits), *held


@dataclass
class Generated:
    """Greedy answers to a batch of prompts: the new token ids per prompt, and the tokens and bytes
    held when each query starts (prompt queries 1..T-1, then every decoded token fed)."""

    tokens: list[list[int]]
    engine: str
    kv_tokens: torch.Tensor
    kv_bytes: torch.Tensor
    kv_tokens_answer: float  # held when the first answer token is fed: the compressed cache after the prompt
    kv_bytes_answer: float


@torch.no_grad()
def generate(model: PreTrainedModel, prompts: torch.Tensor, compression: Compression | None, max_new_tokens: int,
             done: Callable[[list[int]], bool], engine: str = "auto") -> Generated:
    """Greedy decoding of up to `max_new_tokens` after each prompt of `prompts` (n, T), stopping
    once `done(tokens so far)` holds for every prompt of a batch (BATCH prompts decode together, so
    memory does not grow with n). The budget of a `ratio` is taken of T. Every prompt of one length
    holds the same at each step, so the memory returned is the batch's that decoded longest."""
    n, T = prompts.shape
    c = None if compression is None else compression.resolved(T)
    if c is not None and c.positions != "true":
        raise ConfigError(f"decoding after a prompt keeps keys at their true positions; positions={c.positions!r} is "
                          "implemented for the lm task only: use compress.positions=true")
    batches = [_decode(model, prompts[i: i + BATCH], c, max_new_tokens, done, engine) for i in range(0, n, BATCH)]
    longest = max(batches, key=lambda b: len(b.kv_tokens))
    return replace(longest, tokens=[answer for b in batches for answer in b.tokens])


def _decode(model: PreTrainedModel, prompts: torch.Tensor, c: Compression | None, max_new_tokens: int,
            done: Callable[[list[int]], bool], engine: str) -> Generated:
    """`generate` for one batch of prompts, the budget resolved."""
    n, T = prompts.shape
    reader = prompt_engine(c, engine, model)
    cache, logits, *held = _read_batch(model, prompts, c, engine)
    tokens, bytes_ = [held[0]], [held[1]]
    answers: list[list[int]] = [[] for _ in range(n)]
    answer_held = held_now(cache)
    with CacheReader(model, c, cache) as read:
        for step in range(max_new_tokens):
            chosen = logits.argmax(-1)
            for answer, token in zip(answers, chosen.tolist()):
                answer.append(token)
            if step == max_new_tokens - 1 or all(done(a) for a in answers):
                break
            now = held_now(cache)
            tokens.append(torch.tensor([now[0]], dtype=torch.float64))
            bytes_.append(torch.tensor([now[1]], dtype=torch.float64))
            logits = read(chosen.view(n, 1).to(model.device), T + step)[:, -1].float()
    return Generated(answers, reader, torch.cat(tokens), torch.cat(bytes_), *answer_held)
