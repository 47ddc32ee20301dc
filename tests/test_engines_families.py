"""The architecture matrix: every decoder family of `knormpress.sources.tiny` (Llama, Qwen2, Qwen3,
Mistral with and without a sliding window, Phi-3, OLMo 2, GPT-NeoX, Gemma 2, Gemma 3, GPT-2), each
through the one-pass engines (masked, replay) against the token-by-token one, in float64, for a static
and a dynamic strategy (keep_low, tova) x positions {true, rerotate} x interval {1, 5}: the same
logits, held memory and final cache (`test_engines_replay.check`), or a one-line refusal that says why
and what to use instead. The fast suite runs one case per family; `-m slow` the whole grid."""

import itertools

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from knormpress import Compression, ConfigError, run_engine
from knormpress.engines.maths import cache_windows
from knormpress.sources.support import check_supported
from knormpress.sources.tiny import TINY, VOCAB

from conftest import tiny_model
from test_engines_replay import check

FAMILIES = sorted(TINY)
# family -> positions policy -> the refusal's words (a regex): what check_supported and every engine say
REFUSED = {"gpt2": {"rerotate": r"positions='rerotate' moves keys with the model's rotary embedding \(base_model.rotary_emb\), "
                                r"which GPT2LMHeadModel does not have; use positions=true"}}
GRID = [(arch, strategy, positions, interval, engine)
        for arch, strategy, positions, interval in itertools.product(FAMILIES, ["keep_low", "tova"], ["true", "rerotate"], [1, 5])
        for engine in ["replay"] + (["masked"] if strategy == "keep_low" and positions == "true" else [])]
# one case per family, spread over engines, strategies, position policies and intervals
FAST = [("llama", "keep_low", "true", 5, "masked"), ("qwen2", "tova", "rerotate", 1, "replay"),
        ("qwen3", "keep_low", "rerotate", 5, "replay"), ("mistral", "tova", "true", 1, "replay"),
        ("mistral_sliding", "keep_low", "true", 1, "masked"), ("phi3", "tova", "rerotate", 5, "replay"),
        ("olmo2", "keep_low", "true", 1, "replay"), ("gpt_neox", "keep_low", "rerotate", 1, "replay"),
        ("gemma2", "tova", "rerotate", 5, "replay"), ("gemma3", "keep_low", "true", 5, "masked"),
        ("gpt2", "tova", "true", 5, "replay")]
BUDGET = 24  # tokens per compressed layer and KV head, of 64 read
# Gemma 2 runs transformers' eager attention, whose softmax is float32 even for float64 inputs: where the streaming
# engine leaves attention to it (a static strategy under true positions) its caches carry that rounding (~1e-6 here)
CACHE_ATOL = {"gemma2": 1e-5}


@pytest.fixture(scope="module")
def models():
    return {}


def family(models, arch):
    """The family's tiny model in float64 (built once per module) and its uncompressed logits."""
    if arch not in models:
        model = tiny_model(arch).double()
        models[arch] = model, run_engine(model, IDS, None, "masked").logits
    return models[arch]


IDS = torch.randint(0, VOCAB, (64,), generator=torch.Generator().manual_seed(3))


def run_case(models, arch, strategy, positions, interval, engine):
    model, uncompressed = family(models, arch)
    refusal = REFUSED.get(arch, {}).get(positions)
    if refusal:
        with pytest.raises(ConfigError, match=refusal) as said:
            check_supported(model, positions=positions)
        assert "\n" not in str(said.value)
        for name in ("streaming", engine):
            with pytest.raises(ConfigError, match=refusal):
                run_engine(model, IDS, Compression(strategy, BUDGET, 0.5, [0], positions=positions, interval=interval), name)
        return
    check_supported(model, positions=positions)
    a, _ = check(model, IDS, strategy, 0.5, (0,), 0, BUDGET, engine, CACHE_ATOL.get(arch, 1e-10), positions=positions,
                 interval=interval)
    if all(window is not None for window in cache_windows(model)):
        assert torch.equal(a.logits, uncompressed)  # every layer slides (Mistral v0.1): nothing is compressed
    else:
        assert (a.logits - uncompressed).abs().max() > 1e-3  # a control: the compression reached the logits


@pytest.mark.parametrize("arch,strategy,positions,interval,engine", FAST)
def test_every_family_is_exact_or_refused(models, arch, strategy, positions, interval, engine):
    run_case(models, arch, strategy, positions, interval, engine)


@pytest.mark.slow
@pytest.mark.parametrize("arch,strategy,positions,interval,engine", GRID)
def test_every_family_is_exact_or_refused_whole_grid(models, arch, strategy, positions, interval, engine):
    run_case(models, arch, strategy, positions, interval, engine)


@pytest.mark.parametrize("arch", [a for a in FAMILIES if "rerotate" in REFUSED.get(a, {})])
def test_refused_position_policies_fail_before_any_work(models, arch):
    """The refusal comes from check_supported (called by load_model) on the model alone."""
    model, _ = family(models, arch)
    with pytest.raises(ConfigError, match=REFUSED[arch]["rerotate"]):
        check_supported(model, "my-model", positions="rerotate")
    check_supported(model, "my-model", positions="true")


@pytest.mark.parametrize("arch", FAMILIES)
def test_uncompressed_engines_equal_the_models_own_forward(models, arch):
    """transformers' own forward (eager for Gemma 2, with its logit cap and float32 softmax; SDPA for the
    others) against the one-pass engines' uncompressed path: scaling, windows, caps and partial rotary."""
    model, uncompressed = family(models, arch)
    with torch.no_grad():
        plain = model(IDS[None]).logits[0, :-1].float()
    assert (uncompressed - plain).abs().max() <= 1e-5
    assert (run_engine(model, IDS, None, "replay").logits - plain).abs().max() <= 1e-5


def test_gemma2_logit_cap_is_applied():
    """A control for the two tests above: without the cap, Gemma 2's tiny shape gives other logits, so
    engines that dropped the cap would fail them."""
    capped = tiny_model("gemma2").double()
    plain = tiny_model("gemma2").double()
    for layer in plain.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    a, b = (run_engine(m, IDS, Compression("tova", BUDGET, 0.5, [0]), "replay").logits for m in (capped, plain))
    with torch.no_grad():
        own = capped(IDS[None]).logits[0, :-1].float()
    assert (a - b).abs().max() > 1e-2
    assert (run_engine(capped, IDS, None, "masked").logits - own).abs().max() <= 1e-5


def _tiny(config_class, **settings):
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return lambda: AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**shape, **settings)).eval()


# families outside the matrix that the engines or the key shift cannot reproduce: (build, positions, refusal)
OUTSIDE = {
    "cohere (interleaved rotary pairs)": (_tiny("CohereConfig"), "rerotate",
                                          r"would move keys of CohereForCausalLM .* off by .* use positions=true"),
    "glm (interleaved partial rotary)": (_tiny("GlmConfig", head_dim=16), "rerotate",
                                         r"would move keys of GlmForCausalLM .* use positions=true"),
    "stablelm (attention called outside the interface)": (_tiny("StableLmConfig"), "true",
                                                          r"uses attention outside transformers' attention interface"),
    "yarn scaling": (_tiny("LlamaConfig", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                           "original_max_position_embeddings": 64}),
                     "rerotate", r"cannot shift keys under rope type 'yarn'.*use positions=true"),
    "gpt-oss (attention sinks)": (_tiny("GptOssConfig", head_dim=16), "true",
                                  r"uses attention sinks .* cannot reproduce exactly yet; use a model with plain causal"),
}


@pytest.mark.parametrize("case", OUTSIDE)
def test_families_outside_the_matrix_are_refused_in_one_line(case):
    build, positions, refusal = OUTSIDE[case]
    with pytest.raises(ConfigError, match=refusal) as said:
        check_supported(build(), positions=positions)
    assert "\n" not in str(said.value)
