"""Time the plain forward pass, the fastest exact one-pass engine (`engine="auto"`: masked for
static strategies, replay for dynamic ones) and the token-by-token streaming engine.

Prints one JSON line per strategy with `speedup_vs_streaming` (streaming / one-pass) and
`overhead_vs_forward` (one-pass / forward); targets are checked by reading these ratios, not by a
timed test. Example: python scripts/bench_engines.py --strategy keep_low h2o tova keydiff
(add --positions rerotate or --interval 64 for the other position policy and pruning interval)
"""

import argparse
import json
import resource
import time

import torch

from knormpress import Compression, evaluate
from knormpress.engines import pick_engine
from knormpress.sources import load_samples
from knormpress.sources.models import load_model, load_model_config


def seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m", help="a conf/model/*.yaml name")
    p.add_argument("--dataset", default="gutenberg")
    p.add_argument("--max-tokens", type=int, default=3000)
    p.add_argument("--fix-kv-size", type=int, default=512)
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--strategy", nargs="+", default=["keep_low"])
    p.add_argument("--skip-layers", type=int, nargs="*", default=[0, 1], help="no values: compress every layer")
    p.add_argument("--positions", default="true", help="true | rerotate: where kept keys sit after pruning")
    p.add_argument("--interval", type=int, default=1, help="prune back to the budget every N tokens")
    p.add_argument("--no-streaming", dest="streaming", action="store_false", help="skip the slow reference")
    args = p.parse_args()

    bundle = load_model(load_model_config(args.model))
    ids = load_samples({"source": args.dataset}, bundle.tokenizer, bundle.name, n_samples=1,
                       max_tokens=args.max_tokens, start_offset=0, seed=0)[0].input_ids
    with torch.no_grad():
        forward = min(seconds(lambda: bundle.model(input_ids=ids[None], use_cache=False))[0] for _ in range(2))
    for name in args.strategy:
        comp = Compression(name, args.fix_kv_size, args.keep_ratio, args.skip_layers, positions=args.positions,
                           interval=args.interval)
        out = {"model": bundle.name, "tokens": args.max_tokens, "threads": torch.get_num_threads(), "strategy": name,
               "fix_kv_size": args.fix_kv_size, "keep_ratio": args.keep_ratio, "positions": comp.positions,
               "interval": comp.interval, "forward_s": round(forward, 3), "onepass_engine": pick_engine("auto", comp)}
        onepass_s, fast = seconds(lambda: evaluate(bundle.model, ids, comp))
        out["onepass_s"], out["overhead_vs_forward"] = round(onepass_s, 3), round(onepass_s / forward, 3)
        if args.streaming and out["onepass_engine"] != "streaming":
            streaming_s, slow = seconds(lambda: evaluate(bundle.model, ids, comp, engine="streaming", progress=True))
            out["streaming_s"], out["speedup_vs_streaming"] = round(streaming_s, 3), round(streaming_s / onepass_s, 2)
            out["max_abs_nll_diff"] = (fast.nll - slow.nll).abs().max().item()
            out["ppl_onepass"], out["ppl_streaming"] = fast.ppl, slow.ppl
        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
