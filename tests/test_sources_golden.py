"""Golden numbers: each offline model's uncompressed perplexity on one fixed text window, so that a
broken download, join, dequantisation, tokenizer or loader cannot pass the suite.

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
