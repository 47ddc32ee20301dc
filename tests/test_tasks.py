"""Tasks: the registry, and the lm task's records, per-text sums and metrics checked by hand."""

import math

import pandas as pd
import pytest
import torch

from knormpress import ConfigError, Task, get_task
from knormpress.sources.texts import Sample


def records(nll: dict[str, list[float]], correct: dict[str, list[bool]]) -> pd.DataFrame:
    return pd.concat([pd.DataFrame({"text_id": t, "title": t.upper(), "position": range(1, len(v) + 1),
                                    "nll": pd.Series(v, dtype="float32"), "correct": correct[t]})
                      for t, v in nll.items()], ignore_index=True)


RUN = records({"b": [1.0, 2.0], "a": [3.0]}, {"b": [True, False], "a": [True]})
BASE = records({"b": [0.5, 1.5], "a": [2.5]}, {"b": [True, True], "a": [True]})


def test_lm_metrics_by_hand():
    m = get_task("lm").metrics(RUN, None, n_boot=50, seed=0)
    assert m["ppl"] == pytest.approx(math.exp(2.0)) and m["accuracy"] == pytest.approx(2 / 3)
    assert (m["n_texts"], m["n_tokens"]) == (2, 3)
    assert m["ppl_lo"] <= m["ppl"] <= m["ppl_hi"]


def test_lm_deltas_against_the_baseline_by_hand():
    m = get_task("lm").metrics(RUN, BASE, n_boot=50, seed=0)
    assert m["baseline_ppl"] == pytest.approx(math.exp(1.5)) and m["baseline_accuracy"] == pytest.approx(1.0)
    assert m["delta_ppl_pct"] == pytest.approx(100 * (math.exp(0.5) - 1))  # every token 0.5 nats worse
    assert m["delta_accuracy_pct"] == pytest.approx(100 * (2 / 3 - 1))
    assert m["delta_ppl_pct_lo"] == pytest.approx(m["delta_ppl_pct_hi"]) == pytest.approx(m["delta_ppl_pct"])


def test_lm_per_text_sums_keep_the_reading_order():
    table = get_task("lm").per_sample(RUN)
    assert table.text_id.tolist() == ["b", "a"] and table.title.tolist() == ["B", "A"]
    assert table.n_tokens.tolist() == [2, 1] and table.n_correct.tolist() == [1, 1]
    assert table.nll_sum.tolist() == pytest.approx([3.0, 3.0])
    assert table.ppl.tolist() == pytest.approx([math.exp(1.5), math.exp(3.0)])
    assert table.accuracy.tolist() == pytest.approx([0.5, 1.0])


def test_lm_run_gives_one_record_per_predicted_token(model, text_ids):
    sample = Sample("t0", "Title", text_ids[:50])
    out = get_task("lm").run(model, sample, None, "auto", False)
    assert list(out.records.columns) == ["text_id", "title", "position", "nll", "correct"]
    assert out.records.position.tolist() == list(range(1, 50)) and (out.records.text_id == "t0").all()
    assert out.memory["kv_tokens_peak"] == 49 and out.engine == "masked"
    with torch.no_grad():
        logits = model(text_ids[None, :50]).logits[0, :-1]
    manual = torch.nn.functional.cross_entropy(logits, text_ids[1:50], reduction="none")
    assert torch.allclose(torch.tensor(out.records.nll.to_numpy()), manual, atol=1e-4)


def test_lm_refuses_a_budget_the_text_cannot_exceed():
    from knormpress import Compression
    from knormpress.config import EvalConfig

    with pytest.raises(ConfigError, match="fix_kv_size=512 is not smaller than the 511 tokens"):
        get_task("lm").check(Compression(), EvalConfig(max_tokens=512))
    get_task("lm").check(Compression(), EvalConfig(max_tokens=514))


def test_unknown_task_or_setting_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown task 'pasky'; choose one of diagnose, lm"):
        get_task("pasky")
    with pytest.raises(ConfigError, match="task 'lm' has no setting 'depth'; its settings are: none"):
        get_task({"name": "lm", "depth": 3})
    assert isinstance(get_task("lm"), Task)
