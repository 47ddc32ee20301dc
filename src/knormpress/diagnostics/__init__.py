"""Diagnostics: checks of the engines, run by scripts/bench_engines.py and the tests (`agreement`:
where a one-pass engine and the token-by-token one part in the model's dtype), and the measurements
the `diagnose` task runs: whether key norms carry attention (`attention`) and how much of the next
query's attention each strategy keeps (`recall`)."""
