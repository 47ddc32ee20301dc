"""Picking an engine: "auto" takes the first of AUTO that reproduces the setting, a named engine that
cannot is refused in one line that names the ones that can, and the README recipe "Adding an engine"
(one module, written outside the package) gives an engine that runs through `run_engine`,
`evaluate` and a run's config."""

import importlib
import sys

import pytest
import torch

from knormpress import STRATEGIES, Compression, ConfigError, evaluate, run_engine
from knormpress.config import validate
from knormpress.engines import AUTO, pick_engine, usable
from knormpress.engines.base import REGISTRY

from conftest import tiny_model

# The recipe, as README "Adding an engine" gives it.
PLUGIN = '''
from dataclasses import dataclass, replace

from knormpress import Engine, register_engine
from knormpress.engines.streaming import Streaming


@register_engine
@dataclass
class Echo(Engine):
    """The streaming engine under another name, for static strategies only."""

    name = "echo"

    def refuses(self, compression, model=None):
        if compression is not None and not compression.strategy.static:
            return f"strategy {compression.strategy.name!r} is not static"
        return None

    def run(self, model, input_ids, compression, progress):
        return replace(Streaming().run(model, input_ids, compression, progress), engine=self.name)
'''


@pytest.fixture
def echo(tmp_path, monkeypatch):
    """The recipe's module imported from a temporary folder; unregistered afterwards."""
    (tmp_path / "my_engine.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("my_engine")
    yield "echo"
    REGISTRY.classes.pop("echo")
    sys.modules.pop("my_engine")


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("positions", ["true", "rerotate"])
def test_auto_takes_the_first_engine_of_auto_that_does_not_refuse(name, positions):
    c = Compression(name, positions=positions, n_sink=4)
    if STRATEGIES[name].needs_next_query and positions == "rerotate":  # the oracle: no engine can (test_diagnostics_recall)
        return
    first = next(e for e in AUTO if REGISTRY.classes[e]().refuses(c) is None)
    assert pick_engine("auto", c).name == first == usable(c)[0]
    strategy = STRATEGIES[name]
    assert first == ("masked" if strategy.static and positions == "true" else "replay" if strategy.replayable else "streaming")


def test_a_refusal_is_one_line_naming_the_engines_that_would_work():
    with pytest.raises(ConfigError) as said:
        pick_engine("masked", Compression("random_per_step"))
    assert str(said.value) == ("strategy 'random_per_step' re-scores tokens at every step, so engine='masked' cannot "
                               "reproduce it; use engine='streaming' or 'auto'")
    with pytest.raises(ConfigError) as said:
        pick_engine("masked", Compression("keep_low"), cache=True)
    assert str(said.value) == ("decoding after a prompt reads the compressed cache, which engine 'masked' never builds; "
                               "use engine='replay', 'streaming' or 'auto'")
    assert usable(None, cache=True) == ["replay", "streaming"]


def test_a_new_engine_is_one_module(echo, text_ids):
    model, ids = tiny_model("llama"), text_ids[:90]
    c = Compression("keep_low", fix_kv_size=24, skip_layers=[0])
    ours, reference = run_engine(model, ids, c, echo), run_engine(model, ids, c, "streaming")
    assert ours.engine == "echo" and ours.wall_s > 0 and torch.equal(ours.logits, reference.logits)
    assert torch.equal(ours.cache.layers[1].keys, reference.cache.layers[1].keys)
    result = evaluate(model, ids, c, engine=echo)
    assert result.engine == "echo" and torch.equal(result.nll, evaluate(model, ids, c, engine="streaming").nll)
    # "auto" never picks a plug-in; a refusal names it where it would work, and it refuses in its own words
    assert pick_engine("auto", c).name == "masked"
    with pytest.raises(ConfigError, match=r"so engine='masked' cannot reproduce it; use engine='replay', 'streaming', "
                                          r"'echo' or 'auto'$"):
        run_engine(model, ids, Compression("keep_low", fix_kv_size=24, positions="rerotate"), "masked")
    with pytest.raises(ConfigError, match=r"^strategy 'tova' is not static, so engine='echo' cannot reproduce it; "
                                          r"use engine='replay', 'streaming' or 'auto'$"):
        evaluate(model, ids, Compression("tova", fix_kv_size=24), engine=echo)


def test_a_run_config_takes_a_plug_in_engine(echo):
    """`plugins=[my_engine] eval.engine=echo`: the config checks the engine against the registry."""
    model = {"name": "tiny", "source": {"kind": "random", "arch": "llama"}}
    rc, _ = validate({"plugins": ["my_engine"], "eval": {"engine": echo}, "model": model})
    assert rc.eval.engine == "echo"
    with pytest.raises(ConfigError, match="unknown engine 'ech'; choose one of auto, echo, masked, replay, streaming"):
        validate({"eval": {"engine": "ech"}, "model": model})


@pytest.mark.parametrize("engine", AUTO)
@pytest.mark.parametrize("skip", [(), (0,), (0, 2)])
def test_memory_at_the_end_of_a_text_is_the_budget_in_compressed_layers(engine, skip):
    """The seed's measure: when the last of T-1 queries starts, an uncompressed layer holds T-1
    tokens and a compressed one fix_kv_size; the mean over L layers weighs them by count."""
    model = tiny_model("llama")
    T, B, L = 60, 16, model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    out = evaluate(model, ids, Compression("keep_low", B, 0.5, skip), engine=engine)
    base = evaluate(model, ids, None, engine=engine)
    assert base.kv_tokens_last == T - 1
    assert out.kv_tokens_last == pytest.approx((len(skip) * (T - 1) + (L - len(skip)) * B) / L)
    assert out.kv_bytes_last / base.kv_bytes_last == pytest.approx(out.kv_tokens_last / (T - 1))
