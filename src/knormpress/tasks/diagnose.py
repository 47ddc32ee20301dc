"""The `diagnose` task: why a strategy wins. Two measurements over the dataset's token windows:

- the uncompressed run (the baseline every job of one model and samples shares): per layer and KV
  head, the Spearman correlation between a key's norm and the attention later queries give it, with
  the norm as the cache holds it and before the model's key normalisation, and the quantiles of key
  norms (`knormpress.diagnostics.attention`);
- each compressed run: the attention recall of its strategy at its budget, per compressed layer and
  KV head (`knormpress.diagnostics.recall`), in the strategy's own replayed run.

Records: one row per (text, layer, KV head). Metrics: the means over layers, heads and texts
(`spearman`, `spearman_full` over the full-attention layers only, the ones a compression prunes,
`spearman_projected`, `key_norm_q50`; or `recall`), and MLflow step series with step = layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import ClassVar

import pandas as pd

from knormpress.errors import ConfigError
from knormpress.tasks.base import Outcome, Task, register_task


@register_task
@dataclass
class Diagnose(Task):
    """Key-norm and attention statistics (uncompressed) and each strategy's attention recall."""

    name = "diagnose"
    key_metrics = ("recall",)
    columns = ("spearman", "spearman_full", "spearman_projected", "key_norm_q50", "recall", "n_texts", "n_tokens")
    sizes: ClassVar[dict[str, str]] = {"n_texts": "texts", "n_tokens": "tokens"}
    figures = tuple(f"knormpress.report.diagnose_figures:{fn}" for fn in ("norm_attention", "attention_recall"))

    def check(self, compression, ev):
        if compression is None:
            return
        from knormpress.engines.replay import Replay  # no torch at import for the report, but check runs in a job

        why = Replay().refuses(compression) or (
            f"compress.when={compression.when!r}" if compression.when != "streaming" else None) or (
            f"positions={compression.positions!r}" if compression.positions != "true" else None)
        if why:
            raise ConfigError(f"task diagnose measures recall in the replay engine while a text is read, at true "
                              f"positions; {why} is not that (use compress.when=streaming compress.positions=true and a "
                              "replayable strategy)")
        if compression.fix_kv_size is None or compression.fix_kv_size >= ev.max_tokens - 1:
            raise ConfigError(f"compress.fix_kv_size must be set below eval.max_tokens - 1 = {ev.max_tokens - 1} for "
                              f"anything to be evicted, got {compression.fix_kv_size}")

    def run(self, model, sample, compression, engine, progress):
        import torch

        from knormpress.diagnostics.attention import measure
        from knormpress.diagnostics.recall import Recall
        from knormpress.engines import run_engine  # here, not at load: the tasks load without torch

        ids = torch.as_tensor(sample.input_ids)
        if compression is None:
            start = time.perf_counter()
            table, memory = measure(model, ids)
            wall, used = time.perf_counter() - start, "diagnose"
        else:
            c = compression.resolved(len(ids) - 1)
            recall = Recall(strategy=c.strategy, budget=c.budget)
            out = run_engine(model, ids, replace(c, strategy=recall), engine="replay", progress=progress)
            table = pd.DataFrame([{"layer": layer, "head": head, "recall": v.item()}
                                  for layer, heads in recall.by_layer().items() for head, v in enumerate(heads)])
            memory, wall, used = out.memory(), out.wall_s, out.engine
        table.insert(0, "n_tokens", len(ids))
        table.insert(0, "text_id", sample.id)
        return Outcome(table, memory, used, wall)

    def metrics(self, records, baseline, n_boot, seed):
        texts = records.groupby("text_id", sort=False).n_tokens.first()
        m = {"n_texts": float(len(texts)), "n_tokens": float(texts.sum())}
        if "recall" in records:
            return {"recall": float(records.recall.mean())} | m
        full = records[records.window == 0]
        return {"spearman": float(records.spearman.mean()), "spearman_full": float(full.spearman.mean()),
                "spearman_projected": float(records.spearman_projected.mean()),
                "key_norm_q50": float(records.norm_q50.mean())} | m

    def per_sample(self, records):
        """One row per (text, layer, KV head): what the figures draw."""
        return records

    def headline(self, m):
        if "recall" in m:
            return f"attention recall {m['recall']:.3f}"
        return (f"norm-attention spearman {m['spearman']:+.3f} (full-attention layers {m['spearman_full']:+.3f}, "
                f"before key normalisation {m['spearman_projected']:+.3f})")

    def histories(self, records):
        """Per layer (step = layer), the mean over KV heads and texts: spearman_by_layer and
        spearman_projected_by_layer (uncompressed), or recall_by_layer (compressed)."""
        names = ["recall"] if "recall" in records else ["spearman", "spearman_projected"]
        by = records.groupby("layer", sort=True)
        return {f"{n}_by_layer": [(int(k), float(v)) for k, v in by[n].mean().items() if v == v] for n in names}
