"""Tiny random model shapes, defined once: `model=tiny_random` and the unit tests build from this table.

Numbers from these models mean nothing; they exist so that engines, strategies and runs can be
tested in seconds and offline. Every shape uses the byte tokenizer's vocabulary, so any text works.
"""

from typing import Any

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig,
                          MistralConfig, Olmo2Config, Phi3Config, PretrainedConfig, PreTrainedModel, Qwen2Config, Qwen3Config)

from knormpress.errors import ConfigError, choose


class ByteTokenizer:
    """UTF-8 bytes as tokens (id = byte + 3, ids 0-2 left for specials), so random models need no downloaded vocabulary."""

    offset = 3

    def __init__(self, vocab_size: int):
        check_vocab(vocab_size)
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [byte + self.offset for byte in text.encode("utf-8")]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Special ids (below the offset) are always skipped; the keyword is there for callers that pass it."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256).decode("utf-8", errors="replace")


VOCAB = ByteTokenizer.offset + 256  # every prediction is a real byte

_COMMON = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
           "vocab_size": VOCAB, "max_position_embeddings": 8192}
_GQA = {**_COMMON, "num_key_value_heads": 2}  # 4 query heads share 2 KV heads
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # inside the byte vocabulary (defaults lie beyond it)

# arch -> (transformers config class, tiny defaults); the default keys are the settings a model YAML may override.
# One entry per decoder family the engines are checked on (tests/test_engines_families.py).
TINY: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama": (LlamaConfig, _GQA),
    "qwen2": (Qwen2Config, _GQA),  # biased q/k/v projections; lists layer_types, one rotary for all of them
    "qwen3": (Qwen3Config, {**_GQA, "head_dim": 16}),  # per-head RMSNorm of queries and keys before rotary
    "mistral": (MistralConfig, {**_GQA, "sliding_window": None}),  # Mistral 7B v0.2 and later
    "mistral_sliding": (MistralConfig, {**_GQA, "sliding_window": 16}),  # v0.1: every layer slides, no layer_types
    "phi3": (Phi3Config, {**_GQA, **_IDS, "partial_rotary_factor": 0.75}),  # Phi-4-mini's partial rotary
    "olmo2": (Olmo2Config, {**_GQA, **_IDS}),  # RMSNorm over all query and key heads before rotary
    "gpt_neox": (GPTNeoXConfig, {**_COMMON, "rotary_pct": 0.25}),  # Pythia shape: partial rotary
    # Gemma 2 shape: sliding layers 0, 2 (window 16) alternate with full ones, attention logits capped at
    # 10 by tanh; weights 10x the usual init (and scaling 1/8) so the cap changes the logits by ~0.1
    "gemma2": (Gemma2Config, {**_GQA, "head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 64,
                              "attn_logit_softcapping": 10.0, "initializer_range": 0.2}),
    # Gemma 3 shape: sliding-window layers 0, 2 alternate with full layers 1, 3; query_pre_attn_scalar
    # (256) sets the attention scaling, not head_dim, so engines must pass the module's own scaling
    "gemma3": (Gemma3TextConfig, {**_GQA, "head_dim": 16, "sliding_window": 16, "sliding_window_pattern": 2}),
    # GPT-2 shape: learned absolute positions, no rotary (so no positions=rerotate)
    "gpt2": (GPT2Config, {**{k: v for k, v in _COMMON.items() if k != "intermediate_size"}, "n_inner": 128,
                          "bos_token_id": 1, "eos_token_id": 2}),
}


def check_vocab(vocab_size: int) -> None:
    if vocab_size < VOCAB:
        raise ConfigError(f"random model vocab_size={vocab_size} is too small for the byte tokenizer; use vocab_size >= {VOCAB}")


def check_overrides(arch: str, overrides: dict[str, Any]) -> None:
    """Fail on an unknown arch or a setting the tiny shape does not define, before anything is built."""
    choose("model.source.arch", arch, TINY)
    defaults = TINY[arch][1]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(f"model.source.config keys {unknown} do not apply to arch {arch!r}; use only {', '.join(defaults)}")
    check_vocab(overrides.get("vocab_size", VOCAB))


def tiny_config(arch: str, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    overrides = dict(overrides or {})
    check_overrides(arch, overrides)
    cls, defaults = TINY[arch]
    return cls(**{**defaults, **overrides})


def build_random(arch: str, overrides: dict[str, Any] | None = None, *, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A seeded random model in eval mode with transformers' default attention (SDPA, or eager where the
    family has no SDPA path: Gemma 2), leaving the caller's RNG untouched."""
    config = tiny_config(arch, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
