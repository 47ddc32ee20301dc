"""Time a model (default: the offline smollm2_135m) + texts from an empty cache (cold) and again from the filled cache (warm).

Usage: KNORMPRESS_CACHE=$(mktemp -d) python scripts/bench_sources.py [--model smollm2_135m]
"""

import argparse
import json
import logging
import time

from knormpress.sources import cache_dir, load_model, load_model_config, load_samples


def prepare(model: str, cache: str | None, n_samples: int, max_tokens: int) -> float:
    start = time.perf_counter()
    bundle = load_model(load_model_config(model), cache=cache)
    load_samples("gutenberg", bundle.tokenizer, bundle.name, n_samples=n_samples,
                 max_tokens=max_tokens, start_offset=0, seed=0, cache=cache)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model/<name>.yaml")
    parser.add_argument("--cache", help="cache folder (default: $KNORMPRESS_CACHE or ~/.cache/knormpress)")
    parser.add_argument("--n-samples", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=3000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    root = cache_dir(args.cache)
    was_empty = not any(root.iterdir())
    cold = prepare(args.model, args.cache, args.n_samples, args.max_tokens)
    warm = prepare(args.model, args.cache, args.n_samples, args.max_tokens)
    print(json.dumps({"model": args.model, "cold_s": round(cold, 1), "warm_s": round(warm, 1), "cache_was_empty": was_empty, "cache": str(root)}))


if __name__ == "__main__":
    main()
