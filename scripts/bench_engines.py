"""Time the plain forward pass, the fastest exact one-pass engine (`engine="auto"`: masked for
static strategies, replay for dynamic ones) and the token-by-token streaming engine, and measure
how far apart the one-pass and the streaming engine's numbers are in the model's dtype.

Prints one JSON line per strategy (and writes them to --out) with `speedup_vs_streaming`
(streaming / one-pass) and `overhead_vs_forward` (one-pass / forward); targets are checked by
reading these ratios, not by a timed test. Times are per text (mean over the texts); forward and
one-pass are each the best of two runs, back to back.

Agreement, pooled over the texts (see knormpress.diagnostics.agreement): `rel_ppl_diff` (PPL one-pass /
PPL streaming - 1), `accuracy_diff` (one-pass - streaming, a fraction), `correct_flips`,
`max_abs_nll_diff`, `frac_tokens_nll_diff_gt_1e-3`, and the kept sets: `kept_set_diff_queries` of
`kept_set_queries` (queries reading a pruned cache whose kept tokens differ in at least one
compressed layer and KV head), `kept_set_swapped_frac` (the share of kept memberships that differ)
and `first_kept_set_diff_per_text` ([query, layer] or null). Counting the kept sets takes one more
one-pass run per text (seconds) and ~2% of the streaming time, left out of `streaming_s`;
`--no-kept-sets` skips it.

Example: python scripts/bench_engines.py --strategy keep_low h2o tova keydiff
(add --positions rerotate or --interval 64 for the other position policy and a pruning interval; every
compress setting has its flag, from knormpress.spec.Compression; a strategy variant is its label,
e.g. "h2o[normalise=mean]")
The study's bound: python scripts/bench_engines.py --n-samples 3 --out results/engine_agreement.jsonl
"""

import argparse
import json
import resource
import subprocess
import time
from functools import partial
from pathlib import Path

import torch

from knormpress import Compression, evaluate
from knormpress.diagnostics.agreement import Comparison, compare_engines
from knormpress.engines import pick_engine
from knormpress.settings import add_flags, from_flags
from knormpress.sources import load_samples
from knormpress.sources.models import DTYPES, load_model, load_model_config
from knormpress.strategies import REGISTRY


def seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 3)


def git_commit() -> str:
    """This checkout's commit (8 hex digits), with "+dirty" when files differ from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent, check=False)
        return done.stdout.strip()

    return git("rev-parse", "--short=8", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def timed(model, samples, comp: Compression) -> tuple[float, float]:
    """Seconds per text of a plain forward pass and of the one-pass engine, each the best of two runs
    and taken back to back, so that a machine slower for a while slows both."""
    def best(fn) -> float:
        return min(seconds(fn)[0] for _ in range(2))

    with torch.no_grad():
        forward = [best(partial(model, input_ids=s.input_ids[None], use_cache=False)) for s in samples]
    onepass = [best(partial(evaluate, model, s.input_ids, comp)) for s in samples]
    return mean(forward), mean(onepass)


def compare(model, samples, comp: Compression, kept_sets: bool) -> tuple[Comparison, list[float]]:
    """Both engines on every text, pooled; and the streaming time per text (without the counting)."""
    runs, times = [], []
    for sample in samples:
        if kept_sets:
            one = compare_engines(model, sample.input_ids, comp, progress=True)
            times.append(one.streaming[0].wall_s - one.kept[0].seconds)
        else:
            fast = evaluate(model, sample.input_ids, comp)
            slow = evaluate(model, sample.input_ids, comp, engine="streaming", progress=True)
            one = Comparison([fast], [slow])
            times.append(slow.wall_s)
        runs.append(one)
    total = runs[0]
    for one in runs[1:]:
        total = total + one
    return total, times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m", help="a conf/model/*.yaml name")
    p.add_argument("--dtype", default="float32", choices=[d for d in DTYPES if d != "auto"])
    p.add_argument("--dataset", default="gutenberg")
    p.add_argument("--n-samples", type=int, default=1, help="texts (the study uses 3)")
    p.add_argument("--max-tokens", type=int, default=3000)
    p.add_argument("--strategy", nargs="+", default=["keep_low"], help="names or labels, e.g. keydiff[anchor=raw]")
    add_flags(p, Compression)  # --fix-kv-size, --keep-ratio, --skip-layers (no values: every layer), --positions, ...
    p.add_argument("--no-streaming", dest="streaming", action="store_false", help="skip the slow reference")
    p.add_argument("--no-kept-sets", dest="kept_sets", action="store_false",
                   help="do not count kept-set differences between the engines")
    p.add_argument("--out", type=Path, help="also write the JSON lines here (e.g. results/engine_agreement.jsonl, "
                                            "which results/summary.md quotes)")
    args = p.parse_args()

    bundle = load_model(load_model_config(args.model), dtype=args.dtype)
    samples = load_samples(args.dataset, bundle.tokenizer, bundle.name, n_samples=args.n_samples,
                           max_tokens=args.max_tokens, start_offset=0, seed=0)
    lines = []
    for name in args.strategy:
        comp = from_flags(args, Compression, strategy=REGISTRY.node(name))
        out = {"model": bundle.name, "dtype": args.dtype, "dataset": args.dataset, "texts": len(samples),
               "tokens": [len(s.input_ids) for s in samples], "threads": torch.get_num_threads(), "git": git_commit(),
               "compress": comp.to_dict(), "strategy": comp.strategy.label,
               "onepass_engine": pick_engine("auto", comp).name}
        out["forward_s"], out["onepass_s"] = timed(bundle.model, samples, comp)
        out["overhead_vs_forward"] = round(out["onepass_s"] / out["forward_s"], 3)
        if args.streaming and out["onepass_engine"] != "streaming":
            compared, streaming = compare(bundle.model, samples, comp, args.kept_sets)
            out["streaming_s"] = mean(streaming)
            out["speedup_vs_streaming"] = round(out["streaming_s"] / out["onepass_s"], 2)
            out |= compared.summary()
        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        lines.append(json.dumps(out))
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
