"""Retrieval under compression: find one fact in a long prompt (`passkey`, `needle`).

A prompt of exactly `length` tokens hides a key at a depth (0: right after the instruction, 1:
right before the question; the needle goes in at the sentence end nearest before that point),
the model answers greedily (up to `max_new_tokens`), and a trial is correct iff the first number
it generates is the key. Grid: lengths x depths x trials, each prompt with its own seeded key.
How the cache is compressed around the prompt (`compress.when`) is `engines.prompt`'s business.

Samples: the prompts of one length (they decode as one batch). Records: one row per trial
(text_id = trial id, length, depth, trial, key, answer, correct). Metrics: accuracy overall and per
length with 95% Wilson intervals; given the baseline, the relative change in % with a paired
bootstrap interval over trials. Curves: accuracy and its interval along depth (step = depth in
%), one per length: the (length, depth) cells.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from knormpress.errors import ConfigError
from knormpress.metrics import interval, resample_texts, wilson
from knormpress.tasks.base import DatasetInfo, Outcome, Task, register_task

if TYPE_CHECKING:
    import torch

SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")
NUMBER = re.compile(r"\d+")
SNAP = 200  # the needle moves back at most this many tokens to a sentence end


@dataclass
class Prompts:
    """A runner sample: the prompts of one length, as (n, length) token ids, their trials, and the
    tokenizer that reads the answers."""

    id: str
    title: str
    input_ids: torch.Tensor
    trials: list[dict[str, Any]]
    tokenizer: Any


@dataclass
class Retrieval(Task):
    """Base of the retrieval tasks; a subclass gives the instruction, the filler and the needle."""

    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2
    max_new_tokens: int = 8
    key_metrics: ClassVar[tuple[str, ...]] = ("accuracy",)
    columns: ClassVar[tuple[str, ...]] = (
        "accuracy", "accuracy_lo", "accuracy_hi", "baseline_accuracy", "delta_accuracy_pct", "delta_accuracy_pct_lo",
        "delta_accuracy_pct_hi", "accuracy_len*", "kv_bytes_answer", "kv_tokens_answer", "n_trials")
    sizes: ClassVar[dict[str, str]] = {"n_trials": "prompts"}
    setting: ClassVar[dict[str, Any]] = {"fix_kv_size": None, "ratio": 0.5, "when": "prefill"}  # the KnormPress paper's
    # protocol: the prompt read whole, pruned once to half of it (the presets sweep the ratio from there)
    instruction: ClassVar[str]

    def __post_init__(self) -> None:
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 64 for n in self.lengths):
            raise ConfigError(f"task.lengths must be prompt lengths in tokens >= 64, got {self.lengths!r}")
        if not self.depths or any(not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in self.depths):
            raise ConfigError(f"task.depths must be fractions of the prompt in [0, 1], got {self.depths!r}")
        for key in ("trials", "max_new_tokens"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"task.{key} must be an integer >= 1, got {getattr(self, key)!r}")
        self.lengths, self.depths = sorted(set(self.lengths)), sorted({float(d) for d in self.depths})

    # ---- what a subclass provides -------------------------------------------------------------

    def needle(self, rng: random.Random) -> tuple[str, str, str]:
        """(key, the sentence that holds it, the question that asks for it)."""
        raise NotImplementedError

    def fillers(self, bundle: Any, dataset: Any, ev: Any, cache: Any, need: int) -> list[list[int]]:
        """Filler token ids per trial, at least `need` long."""
        raise NotImplementedError

    # ---- the task ---------------------------------------------------------------------------

    def check(self, compression, ev):
        from knormpress.engines import pick_engine  # here, not at load: the tasks load without torch

        pick_engine(ev.engine, compression, cache=True)  # it decodes from the cache after the prompt
        if compression is not None and compression.fix_kv_size is not None and compression.fix_kv_size >= self.lengths[0]:
            raise ConfigError(f"compress.fix_kv_size={compression.fix_kv_size} is not smaller than the shortest prompt "
                              f"({self.lengths[0]} tokens, task.lengths), so nothing would be pruned; lower it or give "
                              "compress.ratio instead")

    def samples(self, bundle, dataset, ev, cache):
        import torch

        from knormpress.sources.texts import leading_specials

        context = getattr(bundle.model.config, "max_position_embeddings", None)
        if context and self.lengths[-1] + self.max_new_tokens > context:
            raise ConfigError(f"a prompt of {self.lengths[-1]} tokens plus {self.max_new_tokens} answer tokens exceeds "
                              f"{bundle.name}'s context of {context} tokens; drop the longer task.lengths")
        tok = bundle.tokenizer
        lead, head = leading_specials(tok), tok.encode(self.instruction, add_special_tokens=False)
        fills = self.fillers(bundle, dataset, ev, cache, self.lengths[-1])
        ends = _SentenceEnds(tok)
        groups = []
        for length in self.lengths:
            rows, trials = [], []
            for depth in self.depths:
                for trial, fill in enumerate(fills):
                    key, sentence, question = self.needle(random.Random(f"{self.name}-{ev.seed}-{length}-{depth}-{trial}"))
                    middle, tail = (tok.encode(s, add_special_tokens=False) for s in (sentence, question))
                    room = length - len(lead) - len(head) - len(middle) - len(tail)
                    if room < 0:
                        raise ConfigError(f"task.lengths {length} is too short for the instruction, needle and question "
                                          f"({length - room} tokens); use lengths >= {length - room + 32}")
                    cut = ends.before(fill, round(depth * room))
                    rows.append(lead + head + fill[:cut] + middle + fill[cut:room] + tail)
                    trials.append({"text_id": f"{self.name}-L{length}-d{depth:g}-t{trial}", "length": length,
                                   "depth": depth, "trial": trial, "key": key})
            groups.append(Prompts(f"{self.name}-L{length}", f"{length}-token prompts", torch.tensor(rows), trials, tok))
        return groups

    def dataset_info(self, samples, dataset):
        name, source_type, source = self.source(dataset)
        return DatasetInfo(name, source_type, source, {"prompts": sum(len(s.trials) for s in samples),
                                                       "tokens": sum(s.input_ids.numel() for s in samples)})

    def source(self, dataset: Any) -> tuple[str, str, dict[str, Any]]:
        """Name, MLflow source type and source of the filler (default: the dataset's texts)."""
        return dataset.source()

    def run(self, model, sample, compression, engine, progress):
        from knormpress.engines.prompt import generate

        tok = sample.tokenizer
        start = time.perf_counter()
        out = generate(model, sample.input_ids, compression, self.max_new_tokens, lambda ids: _answered(ids, tok), engine)
        wall = time.perf_counter() - start
        answers = [tok.decode(ids, skip_special_tokens=True) for ids in out.tokens]
        records = pd.DataFrame(sample.trials).assign(answer=answers)
        records["correct"] = [(m.group() if (m := NUMBER.search(a)) else None) == t["key"]
                              for a, t in zip(answers, sample.trials)]
        memory = {"kv_tokens_peak": out.kv_tokens.max().item(), "kv_tokens_mean": out.kv_tokens.mean().item(),
                  "kv_bytes_peak": out.kv_bytes.max().item(), "kv_bytes_mean": out.kv_bytes.mean().item(),
                  "kv_tokens_answer": out.kv_tokens_answer, "kv_bytes_answer": out.kv_bytes_answer}
        return Outcome(records, memory, out.engine, wall)

    def metrics(self, records, baseline, n_boot, seed):
        m = _accuracy(records.correct, "accuracy") | {"n_trials": len(records)}
        for length, rows in records.groupby("length"):
            m |= _accuracy(rows.correct, f"accuracy_len{length}")
        if baseline is not None:
            base = baseline.set_index("text_id").correct.reindex(records.text_id)
            if base.isna().any():
                raise ValueError("the baseline must cover the same trials")
            a, b = records.correct.to_numpy(float), base.to_numpy(float)
            weights = resample_texts(len(a), n_boot, seed)
            with np.errstate(divide="ignore", invalid="ignore"):
                resampled = 100 * ((weights @ a) / (weights @ b) - 1)
                m |= {"baseline_accuracy": b.mean(), "delta_accuracy_pct": 100 * (a.mean() / b.mean() - 1)}
            m |= dict(zip(("delta_accuracy_pct_lo", "delta_accuracy_pct_hi"), interval(resampled)))
        return m

    def per_sample(self, records):
        return records.drop(columns="answer")

    def headline(self, m):
        change = f", {m['delta_accuracy_pct']:+.1f}% vs baseline" if np.isfinite(m.get("delta_accuracy_pct", np.nan)) else ""
        pace = f", {m['wall_s'] / m['n_trials']:.2f} s per prompt" if "wall_s" in m else ""
        return (f"accuracy {100 * m['accuracy']:.1f}% [{100 * m['accuracy_lo']:.1f}, {100 * m['accuracy_hi']:.1f}] "
                f"of {m['n_trials']:.0f} trials{change}{pace}")

    def histories(self, records):
        curves: dict[str, list[tuple[int, float]]] = {}
        for (length, depth), rows in records.groupby(["length", "depth"]):
            for name, value in _accuracy(rows.correct, f"accuracy_len{length}").items():
                curves.setdefault(name, []).append((round(100 * depth), value))
        return curves


def _accuracy(correct: pd.Series, name: str) -> dict[str, float]:
    k, n = int(correct.sum()), len(correct)
    lo, hi = wilson(k, n)
    return {name: k / n, f"{name}_lo": lo, f"{name}_hi": hi}


def _answered(ids: list[int], tok: Any) -> bool:
    """Decoding can stop: the first number is complete (a non-digit follows it) or the model ended."""
    eos = getattr(tok, "eos_token_id", None)
    return (eos is not None and eos in ids) or bool(re.search(r"\d\D", tok.decode(ids, skip_special_tokens=True)))


class _SentenceEnds:
    """Where a needle may go: after a token whose text ends a sentence (memoised per token id)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.known: dict[int, bool] = {}

    def before(self, fill: list[int], point: int) -> int:
        """The latest sentence end at or before `point` (at most SNAP tokens back), else `point`."""
        for cut in range(point, max(point - SNAP, 0) - 1, -1):
            if cut == 0 or self._ends(fill[cut - 1]):
                return cut
        return point

    def _ends(self, token: int) -> bool:
        if token not in self.known:
            self.known[token] = bool(SENTENCE_END.search(self.tokenizer.decode([token])))
        return self.known[token]


@register_task
@dataclass
class Passkey(Retrieval):
    """The synthetic passkey prompt of Mohtashami and Jaggi (2023, landmark attention): a 5-digit
    key in a line repeated in between the same filler sentences over and over."""

    name = "passkey"
    figures = ("knormpress.report.retrieval_figures:passkey_accuracy",)
    reads = "synthetic filler"
    instruction = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                   "I will quiz you about the important information there.")
    filler: ClassVar[str] = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

    def needle(self, rng):
        key = str(rng.randint(10_000, 99_999))
        return key, f" The pass key is {key}. Remember it. {key} is the pass key.", " What is the pass key? The pass key is"

    def fillers(self, bundle, dataset, ev, cache, need):
        unit = len(bundle.tokenizer.encode(self.filler, add_special_tokens=False))
        fill = bundle.tokenizer.encode(self.filler * (need // unit + 2), add_special_tokens=False)
        return [fill] * self.trials

    def source(self, dataset):
        return "passkey", "local", {"uri": "synthetic:passkey (knormpress.tasks.retrieval.Passkey)"}


@register_task
@dataclass
class Needle(Retrieval):
    """Needle in a haystack: a sentence with a random 7-digit "special magic number" for a word,
    inside real text from the dataset (each trial its own text, the same one at every depth)."""

    name = "needle"
    figures = ("knormpress.report.retrieval_figures:needle_heatmap",)
    instruction = ("A special magic number is hidden somewhere in the following text. Find it and memorize it. "
                   "I will quiz you about it afterwards.")
    words: ClassVar[tuple[str, ...]] = ("apple", "river", "lantern", "violin", "harbor", "meadow", "copper", "falcon",
                                        "garden", "island", "marble", "orchid", "pepper", "saddle", "tunnel", "walnut")

    def needle(self, rng):
        word, key = rng.choice(self.words), str(rng.randint(1_000_000, 9_999_999))
        return (key, f" The special magic number for {word} is {key}.",
                f" What is the special magic number for {word}? The special magic number for {word} is")

    def fillers(self, bundle, dataset, ev, cache, need):
        from knormpress.sources.texts import leading_specials, load_samples

        lead = len(leading_specials(bundle.tokenizer))
        windows = load_samples(dataset, bundle.tokenizer, bundle.name, n_samples=self.trials, max_tokens=need + lead,
                               start_offset=ev.start_offset, seed=ev.seed, cache=cache)
        return [w.input_ids[lead:].tolist() for w in windows]
