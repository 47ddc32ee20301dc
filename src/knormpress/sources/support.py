"""Refuse models whose attention the engines cannot reproduce exactly, instead of reporting wrong numbers.

The engines compute causal softmax attention over the (compressed) cache with the module's own
scaling, logit cap (Gemma 2's `softcap`) and, for sliding-window layers, the module's own window,
through transformers' attention interface. Anything else transformers would add on top (sink
logits, position biases, bidirectional or non-attention layers) would be silently dropped, so such
a model is refused right after loading; so is `positions=rerotate` on a model whose rotary the
project's key shift does not reproduce (`knormpress.rotary.Rotary` checks it against the model's own).
"""

from collections.abc import Callable

import torch
from transformers import PretrainedConfig, PreTrainedModel

from knormpress.errors import ConfigError
from knormpress.rotary import Rotary


def _text(model: PreTrainedModel) -> PretrainedConfig:
    return model.config.get_text_config()


def _layer_types(model: PreTrainedModel) -> set[str]:
    return set(getattr(_text(model), "layer_types", None) or ())


# (feature, predicate on the loaded model): any match refuses the model
UNSUPPORTED: tuple[tuple[str, Callable[[PreTrainedModel], bool]], ...] = (
    ("attention outside transformers' attention interface (e.g. ALiBi or custom kernels)",
     lambda m: not getattr(m, "_supports_attention_backend", False)),
    ("attention sinks (learned per-head sink logits)",
     lambda m: any(isinstance(getattr(module, "sinks", None), torch.Tensor) for module in m.modules())),
    ("bidirectional attention", lambda m: bool(getattr(_text(m), "use_bidirectional_attention", False))),
    ("layers that are neither full nor sliding-window attention (chunked, linear or recurrent)",
     lambda m: bool(_layer_types(m) - {"full_attention", "sliding_attention"})),
)


def check_supported(model: PreTrainedModel, name: str | None = None, positions: str = "true") -> None:
    """Raise one ConfigError line naming the first feature of `model` the engines would silently drop,
    or, for positions="rerotate", why its keys cannot be re-rotated (no rotary, another convention)."""
    for feature, uses in UNSUPPORTED:
        if uses(model):
            label = name or model.config.name_or_path or model.config.model_type
            raise ConfigError(
                f"model {label!r} ({model.config.model_type}) uses {feature}, which the engines cannot reproduce exactly yet; "
                "use a model with plain causal attention such as model=smollm2_135m or model=tiny_random"
            )
    if positions == "rerotate":
        Rotary(model)  # checks its shift against the model's own rotary application
