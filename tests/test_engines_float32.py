"""How far apart the one-pass (masked) and the token-by-token engine are in float32 on the real
model, under the default compression.

The float64 test in test_engines_masked.py shows the kept sets agree exactly when arithmetic is
precise enough. In float32 they do not always (a near-tie in the rounded key norms can be decided
differently by the two engines; see `knormpress.diagnostics.agreement`). This test bounds what that
does to the numbers users get by default: SmolLM2 in float32, keep_low with fix_kv_size 512,
keep_ratio 0.5, skip_layers [0, 1].

The study's full measurement (3 texts x 3000 tokens, ~2,500 one-token streaming steps per text) is
the bench's (`scripts/bench_engines.py --n-samples 3 --out results/engine_agreement.jsonl`): the
first test checks that stored line against the bounds. The suite itself runs both engines on the
first 2 texts x 1024 tokens, the DVC study's length (~500 pruned steps each, a tenth of the streaming work), where every
bound must hold too: each holds for each text on its own, so it holds for texts pooled (pooled PPL
ratio, accuracy difference and share of swapped memberships are token- or slot-weighted means of
the per-text ones). One class per text: with `pytest -n 2` (--dist loadscope) the two streaming
passes run on the two workers at once.
"""

from pathlib import Path

import pytest

from knormpress import Compression
from knormpress.diagnostics.agreement import compare_engines
from knormpress.report.agreement import read_engine_agreement

STUDY_TEXTS, STUDY_TOKENS = 3, 3000  # the full measurement, in results/
N_TOKENS = 1024  # per text in the suite: the DVC study's length (params.yaml)
DEFAULT = Compression("keep_low", 512, 0.5, [0, 1])
RESULTS = Path(__file__).parents[1] / "results"

# Measured (1 thread, 2 CPU cores; the same before and after the one-spec refactor): pooled PPL masked / streaming - 1 = 5.7e-8 (per text at most
# 8.0e-8), no token scored correct by one engine and wrong by the other, max per-token NLL
# difference 0.0038, kept sets differing at 597 of 7,458 queries but in only 2.7e-6 of the kept
# (layer, head, token) memberships.
# Why these bounds: where the flips happen depends on float noise, which changes with the thread
# count and the CPU, so the bounds leave room for flips elsewhere rather than pin today's values.
# 1e-4 on PPL is ~1,700x the measured value, 9x below what the most fragile setting we measured
# gives (fix_kv_size 256, keep_ratio 0, every layer compressed: 8.9e-4, where a swapped token
# counts far more), and 80x below the smallest effect the study reports (keep_ratio 0.6 vs 0.5:
# 0.84%). The PPL bound alone would miss some real mismatches: scoring with unrounded norms
# instead of the 10-bit rule moves the study's PPL by only 4.7e-5 (masked engine, 42.6111 vs
# 42.6091), but changes 2.1e-3 of the kept memberships (measured on the first text's keys), 20x the
# kept-set bound below, which is there to catch that kind of change.
REL_PPL_BOUND = 1e-4
ACCURACY_BOUND = 1e-3  # 3 of a text's 2,999 predicted tokens, net; measured 0
SWAPPED_BOUND = 1e-4  # share of kept memberships that differ; measured 2.7e-6, 2.7e-3 in the fragile setting


def test_the_stored_study_measurement_is_within_the_bounds():
    """The bench's line for the default compression on the study's texts (results/engine_agreement.jsonl)."""
    default = DEFAULT.to_dict()
    rows = [r for r in read_engine_agreement(RESULTS) if r["compress"] == default and "rel_ppl_diff" in r]
    assert len(rows) == 1, "results/engine_agreement.jsonl must hold one measured line for the default compression"
    r = rows[0]
    assert (r["model"], r["dtype"], r["texts"], r["tokens"]) == ("SmolLM2-135M-Instruct", "float32", STUDY_TEXTS,
                                                                 [STUDY_TOKENS] * STUDY_TEXTS)
    assert r["onepass_engine"] == "masked"
    assert abs(r["rel_ppl_diff"]) <= REL_PPL_BOUND and abs(r["accuracy_diff"]) <= ACCURACY_BOUND
    assert r["kept_set_queries"] == STUDY_TEXTS * (STUDY_TOKENS - 2 - DEFAULT.fix_kv_size)
    assert r["kept_set_swapped_frac"] <= SWAPPED_BOUND


@pytest.mark.slow
class _OneText:
    """Both engines on text number `text` of the study's texts, cut to N_TOKENS."""

    text: int

    @pytest.fixture(scope="class")
    def both_engines(self, smollm2):
        """~1.5 min on 1 thread, nearly all of it the streaming pass."""
        from knormpress.sources import load_samples

        samples = load_samples("gutenberg", smollm2.tokenizer, smollm2.name, n_samples=STUDY_TEXTS,
                               max_tokens=STUDY_TOKENS, start_offset=0, seed=0)
        return compare_engines(smollm2.model, samples[self.text].input_ids[:N_TOKENS], DEFAULT)

    def test_float32_engines_agree_on_perplexity_and_accuracy(self, both_engines):
        print(both_engines.summary())  # shown with -rA, so a CI log records today's values
        assert [r.engine for r in both_engines.onepass] == ["masked"]
        assert abs(both_engines.rel_ppl_diff) <= REL_PPL_BOUND
        assert abs(both_engines.accuracy_diff) <= ACCURACY_BOUND

    def test_float32_kept_sets_differ_only_in_a_few_tokens(self, both_engines):
        a = both_engines.agreement
        assert a.queries == N_TOKENS - 2 - DEFAULT.fix_kv_size
        assert a.swapped_frac <= SWAPPED_BOUND


class TestFirstText(_OneText):
    text = 0


class TestSecondText(_OneText):
    text = 1
