"""Refuse models whose attention the engines cannot reproduce exactly, instead of reporting wrong numbers.

The engines compute causal softmax attention over the (compressed) cache with the module's own
scaling, through transformers' attention interface. Anything else transformers would add on top
(a window, a logit cap, sink logits, position biases, bidirectional or non-attention layers) would
be silently dropped, so such a model is refused right after loading.
"""

from collections.abc import Callable

import torch
from transformers import PretrainedConfig, PreTrainedModel

from knormpress.errors import ConfigError


def _text(model: PreTrainedModel) -> PretrainedConfig:
    return model.config.get_text_config()


def _layer_types(model: PreTrainedModel) -> set[str]:
    return set(getattr(_text(model), "layer_types", None) or ())


def _sliding(model: PreTrainedModel) -> bool:
    config = _text(model)
    if getattr(config, "layer_types", None):  # configs with layer types say per layer whether the window applies
        return "sliding_attention" in config.layer_types
    return getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True) is not False


# (feature, predicate on the loaded model): any match refuses the model
UNSUPPORTED: tuple[tuple[str, Callable[[PreTrainedModel], bool]], ...] = (
    ("attention outside transformers' attention interface (e.g. ALiBi or custom kernels)",
     lambda m: not getattr(m, "_supports_attention_backend", False)),
    ("sliding-window attention layers", _sliding),
    ("attention logit soft-capping", lambda m: getattr(_text(m), "attn_logit_softcapping", None) is not None),
    ("attention sinks (learned per-head sink logits)",
     lambda m: any(isinstance(getattr(module, "sinks", None), torch.Tensor) for module in m.modules())),
    ("bidirectional attention", lambda m: bool(getattr(_text(m), "use_bidirectional_attention", False))),
    ("layers that are not plain full attention (chunked, linear or recurrent)",
     lambda m: bool(_layer_types(m) - {"full_attention", "sliding_attention"})),
)


def check_supported(model: PreTrainedModel, name: str | None = None) -> None:
    """Raise one ConfigError line naming the first feature of `model` the engines would silently drop."""
    for feature, uses in UNSUPPORTED:
        if uses(model):
            label = name or model.config.name_or_path or model.config.model_type
            raise ConfigError(
                f"model {label!r} ({model.config.model_type}) uses {feature}, which the engines cannot reproduce exactly yet; "
                "use a model with plain causal attention such as model=smollm2_135m or model=tiny_random"
            )
