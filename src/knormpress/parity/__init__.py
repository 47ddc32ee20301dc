"""Agreement with NVIDIA kvpress, measured: kvpress' presses and our strategies read the same text in
two environments (`kvpress_side` runs in kvpress' own, `compare` here) and their kept sets are
compared step by step; `scripts/kvpress_parity.py` writes results/kvpress_parity.jsonl."""
