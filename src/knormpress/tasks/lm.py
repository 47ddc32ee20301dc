"""The `lm` task: perplexity and next-token accuracy of a model reading long texts.

Records: one row per predicted token (text_id, title, position, nll, correct); position p is
token p predicted from tokens < p. Metrics: ppl = exp(mean NLL over all predicted tokens of all
texts), accuracy likewise pooled, bootstrap intervals over texts and paired deltas to the baseline
(`knormpress.metrics.summarize`). Histories: mean NLL and accuracy per 100 positions, pooled over
texts, so a run's curve shows where along the text the compressed cache starts to cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

from knormpress.errors import ConfigError
from knormpress.metrics import EvalResult, summarize
from knormpress.tasks.base import Outcome, Task, register_task


@register_task
@dataclass
class LanguageModeling(Task):
    """Perplexity and next-token accuracy over every token of each text."""

    name = "lm"
    key_metrics = ("ppl", "accuracy")
    columns = ("ppl", "ppl_lo", "ppl_hi", "accuracy", "accuracy_lo", "accuracy_hi", "baseline_ppl", "baseline_accuracy",
               "delta_ppl_pct", "delta_ppl_pct_lo", "delta_ppl_pct_hi", "delta_accuracy_pct", "delta_accuracy_pct_lo",
               "delta_accuracy_pct_hi", "n_texts", "n_tokens")
    figures = tuple(f"knormpress.report.figures:{fn}" for fn in (
        "strategy_comparison", "keep_ratio_analysis", "ppl_accuracy_tradeoff", "improvement_summary"))
    bucket: ClassVar[int] = 100  # positions per point of the histories

    def check(self, compression, ev):
        if compression is None:
            return
        if compression.when != "streaming":
            raise ConfigError(f"task lm compresses while it reads, so it needs compress.when=streaming, got "
                              f"{compression.when!r} (prefill is for tasks that decode after a prompt: passkey, needle)")
        size = compression.resolved(ev.max_tokens - 1).fix_kv_size
        if size >= ev.max_tokens - 1:
            raise ConfigError(
                f"compress.fix_kv_size={size} is not smaller than the {ev.max_tokens - 1} tokens "
                "a text feeds the cache (eval.max_tokens - 1), so nothing would be evicted; lower "
                "compress.fix_kv_size or raise eval.max_tokens"
            )

    def run(self, model, sample, compression, engine, progress):
        from knormpress.engines import evaluate  # here, not at load: the tasks load without torch

        r = evaluate(model, sample.input_ids, compression, engine=engine, progress=progress)
        records = pd.DataFrame({"text_id": sample.id, "title": sample.title, "position": np.arange(1, r.n_tokens + 1),
                                "nll": r.nll.float().numpy(), "correct": r.correct.bool().numpy()})
        memory = {f"kv_{unit}_{at}": getattr(r, f"kv_{unit}_{at}") for unit in ("tokens", "bytes") for at in ("peak", "mean", "last")}
        return Outcome(records, memory, r.engine, r.wall_s)

    def metrics(self, records, baseline, n_boot, seed):
        return summarize(_results(records), None if baseline is None else _results(baseline), n_boot, seed)

    def per_sample(self, records):
        by_text = records.groupby("text_id", sort=False)
        table = pd.DataFrame({"title": by_text.title.first(), "n_tokens": by_text.size(),
                              "nll_sum": by_text.nll.sum(), "n_correct": by_text.correct.sum()})
        table["ppl"] = np.exp(by_text.nll.apply(lambda x: x.astype(np.float64).mean()))
        table["accuracy"] = table.n_correct / table.n_tokens
        return table.reset_index()

    def headline(self, m):
        def delta(key: str) -> str:
            return f" ({m[key]:+.2f}%)" if key in m else ""

        return (f"ppl {m['ppl']:.3f}{delta('delta_ppl_pct')}, accuracy {100 * m['accuracy']:.2f}%"
                f"{delta('delta_accuracy_pct')}")

    def histories(self, records):
        """nll_by_position, accuracy_by_position: the mean over all texts of the tokens at positions
        [step, step + bucket), step = 0, bucket, 2 * bucket, ..."""
        by = records.groupby(records.position // self.bucket * self.bucket, sort=True)
        nll, accuracy = by.nll.apply(lambda x: x.astype(np.float64).mean()), by.correct.mean()
        return {"nll_by_position": [(int(k), float(v)) for k, v in nll.items()],
                "accuracy_by_position": [(int(k), float(v)) for k, v in accuracy.items()]}


def _results(records: pd.DataFrame) -> list[EvalResult]:
    """Per-text results in the order the texts were read, from a records table."""
    import torch

    nan = float("nan")
    return [EvalResult(torch.tensor(rows.nll.to_numpy()), torch.tensor(rows.correct.to_numpy()),
                       nan, nan, nan, nan, nan, nan, engine="records")
            for _, rows in records.groupby("text_id", sort=False)]
