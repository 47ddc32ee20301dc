"""From logged runs to the report: tables, paired effects, the seed's claims, figures, summary.

- `runs`: MLflow runs and the exported CSVs as tidy tables (one row per run, any task's metrics).
- `effects`: paired bootstrap effects between two runs and the verdict rules.
- `claims`: the seed's published numbers and claims (data: `seed.yaml`) measured on our runs.
- `summary`: results/summary.md.
- `figures`: the seed's four figures.

Only functions that read MLflow import mlflow; nothing here imports torch.
"""
