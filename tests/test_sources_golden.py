"""Golden numbers: each offline model's perplexity on one fixed text window, uncompressed and under one
compression, so that a broken download, join, dequantisation, tokenizer, loader or compressed path cannot
pass the suite.

The window is the first default Gutenberg sample (`load_samples`, seed 0, start_offset 0, 1000
tokens with the model's own tokenizer; for Gemma 3 that is <bos> and 999 text tokens). PPL is
exp(mean NLL) of its 999 next-token predictions from one plain forward pass of transformers
(`model(ids)`, float32, SDPA). Recorded once on CPU (2 cores, torch 2.13.0, transformers 5.24.0)
right after a cold load into an empty cache; any other sound setup agrees far inside +-0.5%.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import first_gutenberg_window

GOLDEN_PPL = {  # model config -> (session fixture, recorded PPL)
    "smollm2_135m": ("smollm2", 29.2052),
    "gemma3_270m": ("gemma3_270m", 32.3084),
}


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(GOLDEN_PPL))
def test_uncompressed_ppl_is_the_recorded_one(config, request):
    fixture, recorded = GOLDEN_PPL[config]
    bundle = request.getfixturevalue(fixture)
    ids = first_gutenberg_window(bundle)
    with torch.no_grad():
        logits = bundle.model(ids[None].to(bundle.model.device)).logits[0, :-1].float().cpu()
    ppl = F.cross_entropy(logits, ids[1:]).exp().item()
    assert ppl == pytest.approx(recorded, rel=0.005), f"{config}: PPL {ppl:.4f}, recorded {recorded}"


GOLDEN_COMPRESSED_PPL = {  # model config -> (session fixture, recorded PPL under COMPRESSED)
    "smollm2_135m": ("smollm2", 38.9862),
    "gemma3_270m": ("gemma3_270m", 62.1456),
}
COMPRESSED = dict(strategy="keep_low", fix_kv_size=128, keep_ratio=0.5, skip_layers=[0, 1])


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(GOLDEN_COMPRESSED_PPL))
def test_compressed_ppl_is_the_recorded_one(config, request):
    """The same window read under keep_low at 128 tokens per layer and KV head (knormpress.evaluate, engine auto,
    float32): a regression pin for the whole compressed path on a real model. Recorded once on CPU with the
    engines checked against tests/reference.py; the streaming engine gave 38.9864 and 62.1456 there."""
    from knormpress import Compression, evaluate

    fixture, recorded = GOLDEN_COMPRESSED_PPL[config]
    bundle = request.getfixturevalue(fixture)
    ppl = evaluate(bundle.model, first_gutenberg_window(bundle), Compression(**COMPRESSED)).ppl
    assert ppl == pytest.approx(recorded, rel=0.005), f"{config}: PPL {ppl:.4f}, recorded {recorded}"
