"""Diagnostics of the engines, run by scripts/bench_engines.py and the tests, never by a job: where a
one-pass engine and the token-by-token one part in the model's dtype (`agreement`)."""
