"""The seed's claims decided on hand-built runs whose effects are known exactly: every text of a
run has the same PPL (accuracy) ratio to the baseline, so every bootstrap resample gives that ratio
and the verdicts below follow from the numbers by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from report_data import GEMMA, SMOL, per_text, rerotated_ablations, seed_like, tables, two_models

from knormpress.errors import ConfigError
from knormpress.report.claims import improvements, load_claims, rule_lines, verdict_metrics, verdicts
from knormpress.report.effects import FAILS, HOLDS, INCONCLUSIVE, UNMEASURABLE

STRATEGIES_PPL = "keep_low has lower PPL than random and recent_only at keep_ratio 0.5"
STRATEGIES_ACC = "keep_low has higher accuracy than random and recent_only at keep_ratio 0.5"
EVERY_RATIO = "keep_low has lower PPL than random at every keep_ratio"
BEST_RATIO = "best keep_ratio for keep_low (lowest PPL) is 0.4-0.5"
TRUE, REROTATE = " (positions=true)", " (positions=rerotate)"  # the ablation claims, one verdict per policy
TEMPORAL_PPL, TEMPORAL_ACC = "temporal order lowers PPL by 2-5%" + TRUE, "temporal order raises accuracy by 0.5-1%" + TRUE
MIXED_PPL, MIXED_ACC = "mixed retention lowers PPL by 3-5%" + TRUE, "mixed retention raises accuracy by 1-2%" + TRUE
PER_POLICY = [TEMPORAL_PPL, TEMPORAL_ACC, MIXED_PPL, MIXED_ACC]
MEMORY = "memory saving 83% (3000 -> 512 tokens)"
PASSKEY = "KnormPress paper: keep_low loses no passkey accuracy at compress.ratio 0.9 (10% of the cache kept)"
NEEDLE = "KnormPress paper: keep_low loses no needle-in-a-haystack accuracy at compress.ratio 0.5"


def _claims(specs: list[tuple], texts: pd.DataFrame | None = None) -> pd.DataFrame:
    runs, all_texts = tables(specs)
    return verdicts(runs, all_texts if texts is None else texts).set_index("claim")


def _replace(specs: list[tuple], run_id: str, **changes) -> list[tuple]:
    """The specs with one run's fields changed (ppl, acc: factors; extra: run fields)."""
    out = []
    for spec in specs:
        if spec[0] == run_id:
            rid, exp, strategy, ratio, f_ppl, f_acc, *extra = spec
            spec = (rid, exp, strategy, ratio, changes.get("ppl", f_ppl), changes.get("acc", f_acc),
                    (extra[0] if extra else {}) | changes.get("extra", {}))
        out.append(spec)
    return out


SEED_LIKE_VERDICTS = {
    STRATEGIES_PPL: HOLDS,  # -4.55% vs random, -7.08% vs recent_only
    STRATEGIES_ACC: HOLDS,  # +2.11%, +2.32%
    EVERY_RATIO: HOLDS,  # -1.85, -3.67, -5.45, -3.60%
    BEST_RATIO: HOLDS,  # r=0.5 (1.04) beats the best outside, r=0.3 (1.06): -1.89%
    TEMPORAL_PPL: FAILS, TEMPORAL_ACC: FAILS,  # identical runs
    MIXED_PPL: HOLDS,  # 1.04 / 1.08: -3.70%, inside -5..-3%
    MIXED_ACC: HOLDS,  # 0.98 / 0.965: +1.55%, inside 1..2%
    **{c.replace(TRUE, REROTATE): UNMEASURABLE for c in PER_POLICY},  # no rerotate runs
    MEMORY: HOLDS,  # 82.9% (every layer compressed) within 83 +- 1
    PASSKEY: UNMEASURABLE, NEEDLE: UNMEASURABLE,  # no retrieval runs
}


def test_seed_like_runs():
    table = _claims(seed_like())
    assert table.verdict.to_dict() == SEED_LIKE_VERDICTS
    assert table.measured[STRATEGIES_PPL] == "vs random: -4.55% [-4.55, -4.55]; vs recent_only: -7.08% [-7.08, -7.08]"
    assert table.measured[EVERY_RATIO].startswith("r=0.3: -1.85% [-1.85, -1.85]; r=0.4: -3.67%")
    assert table.measured[BEST_RATIO] == "argmin r=0.5; best inside (r=0.5) vs outside (r=0.3): -1.89% [-1.89, -1.89]"
    assert table.measured[TEMPORAL_PPL] == "sorted vs unsorted: +0.00% (identical per-text NLLs)"
    assert table.measured[MEMORY] == ("82.9% of KV bytes at the end of a 3000-token text, every layer compressed "
                                      "(77.4% with skip layers [0, 1] left whole)")
    assert table.claimed.to_dict() == {
        STRATEGIES_PPL: "< 0%", STRATEGIES_ACC: "> 0%", EVERY_RATIO: "< 0%", BEST_RATIO: "argmin in range",
        TEMPORAL_PPL: "-5 to -2%", TEMPORAL_ACC: "+0.5 to +1%", MIXED_PPL: "-5 to -3%", MIXED_ACC: "+1 to +2%",
        **{c.replace(TRUE, REROTATE): table.claimed[c] for c in PER_POLICY}, MEMORY: "83%",
        PASSKEY: "no loss (change > -5%)", NEEDLE: "no loss (change > -5%)",
    }


def test_each_position_policy_gets_its_own_verdict():
    """Time order cannot matter under true positions (identical runs) and can under rerotate."""
    table = _claims(seed_like() + rerotated_ablations())
    assert table.verdict[TEMPORAL_PPL] == table.verdict[TEMPORAL_ACC] == FAILS
    assert table.verdict[TEMPORAL_PPL.replace(TRUE, REROTATE)] == HOLDS  # 1.04 / 1.08: -3.70%
    assert table.verdict[TEMPORAL_ACC.replace(TRUE, REROTATE)] == HOLDS  # 0.98 / 0.975: +0.51%
    # 1.04 / 1.05: -0.95%, every text alike (a zero-width interval): the direction, 3 / 0.95 = 3.2x short of -3%
    assert table.verdict[MIXED_PPL.replace(TRUE, REROTATE)] == "direction holds, 3.2x smaller than claimed"
    assert table.measured[TEMPORAL_PPL.replace(TRUE, REROTATE)] == "sorted vs unsorted: -3.70% [-3.70, -3.70]"
    assert list(table.index).count(TEMPORAL_PPL) == 1  # the other experiments' runs do not add policies


@pytest.mark.parametrize(("changes", "claim", "want"), [
    ([("s-low", {"ppl": 1.12})], STRATEGIES_PPL, FAILS),  # worse than random (1.10), better than recent_only
    ([("k-low0.6", {"ppl": 1.12})], EVERY_RATIO, FAILS),  # random 1.11 beats it at r=0.6
    ([("k-low0.6", {"ppl": 1.00})], BEST_RATIO, FAILS),  # r=0.6 is best: inside vs outside is +4%
    ([("a-pure", {"ppl": 1.05})], MIXED_PPL, "direction holds, 3.2x smaller than claimed"),  # -0.95%: 3 / 0.95
    ([("a-pure", {"acc": 0.90})], MIXED_ACC, "direction holds, 4.4x larger than claimed"),  # 0.98 / 0.9: +8.89%, / 2
    ([("a-unsorted", {"ppl": 1.08})], TEMPORAL_PPL, HOLDS),  # 1.04 / 1.08: -3.70%
    ([("m-all", {"extra": {"memory_saving_last_pct": 77.4}})], MEMORY, FAILS),  # like for like: 77.4 is not 83 +- 1
])
def test_verdicts_follow_the_numbers(changes, claim, want):
    specs = seed_like()
    for run_id, change in changes:
        specs = _replace(specs, run_id, **change)
    assert _claims(specs).verdict[claim] == want


def test_missing_runs_and_missing_texts():
    specs = [s for s in seed_like() if s[1] != "ablations"]
    table = _claims(specs)
    assert table.verdict[TEMPORAL_PPL] == table.verdict[MIXED_ACC] == UNMEASURABLE
    assert table.measured[TEMPORAL_PPL] == "sorted vs unsorted: no runs"
    table = _claims(seed_like(), texts=per_text("nobody").iloc[:0])  # no per-text rows: no intervals
    assert table.verdict[STRATEGIES_PPL] == table.verdict[BEST_RATIO] == INCONCLUSIVE
    assert table.measured[STRATEGIES_PPL] == "vs random: -4.55%; vs recent_only: -7.08%"
    assert table.verdict[MEMORY] == HOLDS  # deterministic, needs no texts
    runs, texts = tables(seed_like())
    assert set(verdicts(runs.iloc[:0], texts.iloc[:0]).verdict) == {UNMEASURABLE}


def test_an_interval_across_zero_is_inconclusive():
    # keep_low is 10% better on texts 0 and 2 and 10% worse on texts 1 and 3 than random; a
    # resample of only texts 0 and 2 (or 1 and 3) has probability 1/16 > 2.5%, so the interval
    # reaches from -10% to +10%.
    runs, texts = tables(seed_like())
    low = texts.run_id == "s-low"
    texts.loc[low, "nll_sum"] = per_text("s-low", 1.10 * np.array([0.9, 1.1, 0.9, 1.1])).nll_sum.to_numpy()
    table = verdicts(runs, texts).set_index("claim")
    assert table.verdict[STRATEGIES_PPL] == INCONCLUSIVE  # vs random: inconclusive; vs recent_only: holds
    assert "vs random: -4.55% [-10.00, +10.00]" in table.measured[STRATEGIES_PPL]


def test_claims_are_data():
    """A claim on any experiment and strategies, of each kind, needs no code."""
    claims = {"setup": "-", "tables": [], "figures": {}, "claims": [
        {"claim": "foo beats bar", "key": "foo_beats_bar", "kind": "paired", "experiment": "toy", "metric": "ppl", "claimed": "lower",
         "a": {"strategy": "foo"}, "b": {"vs bar": {"strategy": "bar"}}},
        {"claim": "foo is fast", "key": "foo_fast", "kind": "value", "experiment": "toy", "run": {"strategy": "foo"}, "metric": "wall_s",
         "claimed": 2.0, "tolerance": 0.5, "unit": " s"},
        {"claim": "foo peaks at 0.2-0.3", "key": "foo_peak", "kind": "best_in_range", "experiment": "toy", "runs": {"strategy": "foo"},
         "column": "keep_ratio", "range": [0.2, 0.3], "metric": "accuracy", "best": "highest"},
    ]}
    runs, texts = tables([
        ("foo-a", "toy", "foo", 0.5, 0.95, 1.00, {"start_time": 1}),
        ("foo-b", "toy", "foo", 0.25, 0.90, 1.02, {"start_time": 2, "wall_s": 2.3}),
        ("bar", "toy", "bar", 0.25, 1.00, 1.00),
        ("elsewhere", "other", "bar", 0.25, 0.5, 1.0),
    ])
    table = verdicts(runs, texts, claims)
    assert table.to_dict("records") == [
        {"model": "tiny", "claim": "foo beats bar", "claimed": "< 0%", "measured": "vs bar: -10.00% [-10.00, -10.00]",
         "verdict": HOLDS, "key": "foo_beats_bar"},
        {"model": "tiny", "claim": "foo is fast", "claimed": "2 s", "measured": "2.3", "verdict": HOLDS, "key": "foo_fast"},
        {"model": "tiny", "claim": "foo peaks at 0.2-0.3", "claimed": "argmax in range",
         "measured": "argmax keep_ratio=0.25; best inside (keep_ratio=0.25) vs outside (keep_ratio=0.5): +2.00% "
                     "[+2.00, +2.00]", "verdict": HOLDS, "key": "foo_peak"},
    ]
    assert verdict_metrics(runs, texts, claims) == {"tiny": {"foo_beats_bar": HOLDS, "foo_fast": HOLDS, "foo_peak": HOLDS}}


def test_two_models_are_decided_apart():
    """Gemma's runs share strategies and text ids with SmolLM2's and are newer: any pick or pairing
    across models would change SmolLM2's numbers or mix them into Gemma's."""
    table = verdicts(*tables(two_models()))
    assert table.model.tolist() == [SMOL] * 15 + [GEMMA] * 15  # SmolLM2 ran more experiments; 4 claims per policy
    smol, gemma = (table[table.model == m].set_index("claim") for m in (SMOL, GEMMA))
    assert smol.verdict.to_dict() == SEED_LIKE_VERDICTS
    assert smol.measured[STRATEGIES_PPL] == "vs random: -4.55% [-4.55, -4.55]; vs recent_only: -7.08% [-7.08, -7.08]"
    assert smol.measured[MEMORY].startswith("82.9%")
    assert gemma.verdict.to_dict() == {
        STRATEGIES_PPL: FAILS,  # 0.96 / 0.864: +11.11% vs random, 0.96 / 0.88: +9.09% vs recent_only
        STRATEGIES_ACC: FAILS,  # 0.99 / 1.056: -6.25%, 0.99 / 1.045: -5.26%
        EVERY_RATIO: UNMEASURABLE, BEST_RATIO: UNMEASURABLE,  # keep_ratio not run for Gemma
        **{c.replace(TRUE, policy): UNMEASURABLE for c in PER_POLICY for policy in (TRUE, REROTATE)},  # nor ablations
        MEMORY: FAILS,  # 44.7% with every layer compressed
        PASSKEY: UNMEASURABLE, NEEDLE: UNMEASURABLE,  # no retrieval runs
    }
    assert gemma.measured[STRATEGIES_PPL] == ("vs random: +11.11% [+11.11, +11.11]; "
                                              "vs recent_only: +9.09% [+9.09, +9.09]")
    assert gemma.measured[STRATEGIES_ACC] == "vs random: -6.25% [-6.25, -6.25]; vs recent_only: -5.26% [-5.26, -5.26]"
    assert (gemma.measured[EVERY_RATIO], gemma.measured[BEST_RATIO]) == ("no runs", "no runs")
    assert gemma.measured[MIXED_PPL] == "keep_ratio 0.5 vs 0: no runs"
    assert gemma.measured[MEMORY] == ("44.7% of KV bytes at the end of a 3000-token text, every layer compressed "
                                      "(40.0% with skip layers [0, 1] left whole)")


def test_improvements_for_the_figure():
    got = [(i["improvement"], i["label"], i["metric"], i["claimed"], i["verdict"])
           for i in improvements(*tables(seed_like()))]
    assert got == [
        ("temporal order" + TRUE, "sorted vs unsorted", "ppl", (-5.0, -2.0), FAILS),
        ("temporal order" + REROTATE, "sorted vs unsorted", "ppl", (-5.0, -2.0), UNMEASURABLE),
        ("temporal order" + TRUE, "sorted vs unsorted", "accuracy", (0.5, 1.0), FAILS),
        ("temporal order" + REROTATE, "sorted vs unsorted", "accuracy", (0.5, 1.0), UNMEASURABLE),
        ("mixed retention" + TRUE, "keep_ratio 0.5 vs 0", "ppl", (-5.0, -3.0), HOLDS),
        ("mixed retention" + REROTATE, "keep_ratio 0.5 vs 0", "ppl", (-5.0, -3.0), UNMEASURABLE),
        ("mixed retention" + TRUE, "keep_ratio 0.5 vs 0", "accuracy", (1.0, 2.0), HOLDS),
        ("mixed retention" + REROTATE, "keep_ratio 0.5 vs 0", "accuracy", (1.0, 2.0), UNMEASURABLE),
    ]
    got = [(i["model"], i["improvement"], i["metric"], i["verdict"]) for i in improvements(*tables(two_models()))]
    smol = [(SMOL, n + TRUE, m, v) for n, m, v in (("temporal order", "ppl", FAILS), ("temporal order", "accuracy", FAILS),
                                                   ("mixed retention", "ppl", HOLDS), ("mixed retention", "accuracy", HOLDS))]
    for i in (3, 2, 1, 0):  # each policy=true item is followed by its rerotate twin, not measured here
        smol.insert(i + 1, (SMOL, smol[i][1].replace(TRUE, REROTATE), smol[i][2], UNMEASURABLE))
    assert got == smol + [(GEMMA, name + policy, metric, UNMEASURABLE) for name in ("temporal order", "mixed retention")
                          for metric in ("ppl", "accuracy") for policy in (TRUE, REROTATE)]


def test_packaged_claims_data():
    claims = load_claims()
    assert claims["setup"].startswith("EleutherAI/pythia-70m-deduped on PG-19")
    assert [t["kind"] for t in claims["tables"]] == ["strategies", "grid", "strategies"]
    assert claims["tables"][1]["seed"][0.4]["keep_low"] == {"ppl": 49.59, "accuracy": 0.3466}  # SUMMARY.md: 49.59, 34.66%
    assert len(claims["claims"]) == 11 and len({c["claim"] for c in claims["claims"]}) == 11  # 9 of the seed, 2 of the paper
    assert rule_lines(claims)[:2] == [
        "Best keep_ratio: the best keep_low run inside the claimed range vs the best one outside it (PPL).",
        "Memory saving is deterministic: it holds within +-1 percentage point of the claim.",
    ]
    assert "lies above -5%" in rule_lines(claims)[2]


def test_bad_claims_files(tmp_path):
    path = tmp_path / "claims.yaml"
    path.write_text("setup: x\ntables: []\nfigures: {}\nclaims:\n  - {claim: c, key: c, kind: guess}\n")
    with pytest.raises(ConfigError, match="unknown kind 'guess'; choose one of paired, best_in_range, value"):
        load_claims(path)
    path.write_text("setup: x\ntables: []\nfigures: {}\nclaims:\n  - {claim: c c, kind: paired}\n")
    with pytest.raises(ConfigError, match="claim 'c c' needs a `key`"):
        load_claims(path)
    path.write_text("setup: x\nclaims: []\n")
    with pytest.raises(ConfigError, match="missing top-level key 'tables'"):
        load_claims(path)


def retrieval(base: list[bool], low: list[bool], model: str = "tiny") -> tuple[pd.DataFrame, pd.DataFrame]:
    """A passkey baseline and keep_low at ratio 0.9 of one model with these per-trial outcomes."""
    from knormpress.report.runs import tidy

    runs, texts = [], []
    for name, role, strategy, ratio, correct in (("b", "baseline", "none", None, base), ("k", "compressed", "keep_low", 0.9, low)):
        run_id = f"{model}-{name}"
        runs.append({"run_id": run_id, "experiment": "passkey", "role": role, "strategy": strategy, "ratio": ratio,
                     "accuracy": np.mean(correct), "start_time": 0, "model": model})
        texts += [{"run_id": run_id, "text_id": f"t{i}", "correct": c} for i, c in enumerate(correct)]
    return tidy(pd.DataFrame(runs)), pd.DataFrame(texts)


@pytest.mark.parametrize(("base", "low", "want", "measured"), [
    ([True] * 10, [True] * 10, HOLDS, "+0.00% (identical per-text NLLs)"),  # nothing lost
    ([True] * 10, [False] * 10, FAILS, "-100.00% [-100.00, -100.00]"),  # every trial lost
    ([True] * 10, [False] + [True] * 9, INCONCLUSIVE, "-10.00%"),  # one of ten: the interval reaches past -5% and 0
])
def test_no_loss_claims_on_retrieval_trials(base, low, want, measured):
    table = verdicts(*retrieval(base, low)).set_index("claim")
    assert table.verdict[PASSKEY] == want and table.measured[PASSKEY].startswith(f"vs baseline: {measured}")
    assert table.verdict[NEEDLE] == UNMEASURABLE


def test_retrieval_claims_are_decided_per_model():
    """Same text ids in both models: pairing across models would mix Gemma's lost trials into SmolLM2's."""
    smol, gemma = retrieval([True] * 10, [True] * 10, SMOL), retrieval([True] * 10, [False] * 10, GEMMA)
    table = verdicts(*(pd.concat([a, b], ignore_index=True) for a, b in zip(smol, gemma)))
    got = table[table.claim == PASSKEY].set_index("model")
    assert got.verdict.to_dict() == {GEMMA: FAILS, SMOL: HOLDS}  # same number of experiments: by name
    assert got.measured[GEMMA] == "vs baseline: -100.00% [-100.00, -100.00]"
