"""Evaluate one KV-cache compression config, or sweep many with -m; configs live in conf/.

    python run.py                                   # SmolLM2 + Gutenberg, keep_low vs baseline
    python run.py compress=random compress.keep_ratio=0.3
    python run.py -m experiment=strategies          # a preset grid, one MLflow run per job
"""

from knormpress.cli import cli

if __name__ == "__main__":
    cli()
