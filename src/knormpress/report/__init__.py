"""From logged runs to the report: tables, paired effects, the seed's claims, figures, summary.

- `runs`: MLflow runs and the exported CSVs as tidy tables (one row per run, any task's metrics).
- `effects`: paired bootstrap effects between two runs and the verdict rules.
- `claims`: the seed write-up's published numbers and claims (data: `claims.yaml`) measured on our runs.
- `summary`: results/summary.md.
- `figures`: the seed's four figures (`panels`: their colours, error bars and a row of panels per model).

Runs of several models (the `model` column) are split with `effects.by_model`: claims pair runs of
one model only; the summary and figures give each model its own sections and panels.
Only functions that read MLflow import mlflow; nothing here imports torch.
"""
