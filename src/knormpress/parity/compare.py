"""Our side of the kvpress parity check and the comparison: the same text, budget and weights read by
knormpress' token-by-token engine and by NVIDIA kvpress' presses, kept sets compared step by step.

kvpress runs in its own environment (`kvpress_side`, started with that environment's interpreter);
the two processes exchange the token ids, logits and kept positions through files in a temporary
folder. Our side prunes with `Compression(strategy, fix_kv_size=B, keep_ratio=0, skip_layers=[],
interval=1)`: every layer, no recent window, after every token, like kvpress' DecodingPress with
compression_interval=1 and target_size=B.

A kept set is what one layer and KV head holds after one pruning (after token t, for t = B .. T-2);
the count of those that differ is the measure of agreement, with the PPL of both and the largest
logit difference.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from knormpress.compression import Compression
from knormpress.engines import run_engine
from knormpress.diagnostics.agreement import watching
from knormpress.errors import ConfigError
from knormpress.eviction import select
from knormpress.parity import kvpress_side
from knormpress.strategies import CacheView

OURS = {"knorm": "keep_low", "tova": "tova", "keydiff": "keydiff"}  # kvpress press -> our strategy
MODES = kvpress_side.MODES
VENV = "../kvpress-venv"  # next to the repository, outside it
VENV_RECIPE = f"python3 -m venv {VENV} && {VENV}/bin/pip install kvpress=={kvpress_side.KVPRESS_VERSION} torch==2.13.0"


@dataclass
class Reading:
    """One run over the text: logits (T-1, vocab), row q predicting token q+1; kept (steps, layers,
    kv_heads, B) the positions each layer and KV head held after each pruning, ascending."""

    logits: torch.Tensor
    kept: torch.Tensor


def compression_for(press: str, fix_kv_size: int) -> Compression:
    """Our counterpart of kvpress' DecodingPress(<press>, compression_interval=1, target_size=B)."""
    return Compression(OURS[press], fix_kv_size=fix_kv_size, keep_ratio=0.0, skip_layers=(), interval=1)


def read_ours(model: PreTrainedModel, input_ids: torch.Tensor, compression: Compression) -> Reading:
    """The streaming engine over input_ids (T,), recording what `select` keeps at each pruning."""
    kept: dict[int, list[torch.Tensor]] = {}

    def record(view: CacheView, scores: torch.Tensor) -> None:
        length = int(view.positions.max()) + 1
        keep = select(scores, view.positions, length, compression.budget, compression.sort_by_time)
        kept.setdefault(view.layer, []).append(view.positions.gather(-1, keep)[0].sort(dim=-1).values.int())

    out = run_engine(model, input_ids, watching(compression, record), engine="streaming")
    return Reading(out.logits, torch.stack([torch.stack(kept[layer]) for layer in sorted(kept)], dim=1))


def kept_set_differences(ours: torch.Tensor, theirs: torch.Tensor, first_step: int) -> dict[str, object]:
    """Kept sets (steps, layers, kv_heads, B), ascending, compared set by set. `first_step`: the token
    after which the first pruning happened. Returns the count that differ, the total and the first
    difference (after which token, in which layer and KV head; None when all agree)."""
    if ours.shape != theirs.shape:
        raise ValueError(f"kept sets of different shapes: ours {tuple(ours.shape)}, kvpress {tuple(theirs.shape)}")
    differ = (ours != theirs).any(dim=-1)
    where = differ.nonzero()
    first = None if where.numel() == 0 else dict(zip(("after_token", "layer", "kv_head"), where[0].tolist()))
    if first is not None:
        first["after_token"] += first_step
    return {"kept_sets_differ": int(differ.sum()), "kept_sets": differ.numel(), "first_difference": first}


def ppl(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """exp(mean NLL) of the next-token predictions, as the lm task computes it."""
    nll = F.cross_entropy(logits, input_ids.view(-1)[1:], reduction="none")
    return math.exp(nll.double().mean().item())


def parity_row(press: str, mode: str, ours: Reading, theirs: Reading, input_ids: torch.Tensor,
               first_step: int) -> dict[str, object]:
    """One line of results/kvpress_parity.jsonl, without the setting. The logit difference is also
    given over the queries that read an unpruned cache (rows 0 .. first_step): what differs there
    comes from how the two sides compute attention, not from what they keep."""
    diff = (ours.logits - theirs.logits).abs()
    return {"press": press, "kvpress": kvpress_side.PRESSES[press], "ours": OURS[press], "mode": mode,
            **kept_set_differences(ours.kept, theirs.kept, first_step),
            "ppl_ours": ppl(ours.logits, input_ids), "ppl_kvpress": ppl(theirs.logits, input_ids),
            "max_abs_logit_diff": diff.max().item(), "max_abs_logit_diff_unpruned": diff[: first_step + 1].max().item()}


def kvpress_version(python: str | Path) -> str:
    """The kvpress release installed for `python`; one line naming the recipe when there is none."""
    if not Path(python).exists():
        raise ConfigError(f"no kvpress environment at {python}: create it outside the repository with "
                          f"`{VENV_RECIPE}` or pass --kvpress-python")
    probe = "import importlib.metadata as m; print(m.version('kvpress'))"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError(f"{python} has no kvpress: create the environment with `{VENV_RECIPE}`")
    found = done.stdout.strip()
    if found != kvpress_side.KVPRESS_VERSION:
        raise ConfigError(f"{python} has kvpress {found}; this check drives kvpress {kvpress_side.KVPRESS_VERSION} "
                          f"(`{VENV_RECIPE}`)")
    return found


def compare_with_kvpress(model: PreTrainedModel, model_dir: Path, input_ids: torch.Tensor, presses: list[str],
                         fix_kv_size: int, python: str | Path, threads: int) -> tuple[list[dict], dict[str, str]]:
    """Rows for every press and mode, and the kvpress environment's versions. kvpress reads the text
    in its own process (started first, so the two sides overlap) while our engine reads it here."""
    kvpress_version(python)
    T = input_ids.numel()
    if T <= fix_kv_size + 1:
        raise ConfigError(f"{T} tokens never fill fix_kv_size={fix_kv_size}; use more tokens or a smaller budget")
    with tempfile.TemporaryDirectory(prefix="kvpress-parity-") as tmp:
        files = {(p, m): str(Path(tmp) / f"{p}-{i}.pt") for p in presses for i, m in enumerate(MODES)}
        request = {"model_dir": str(model_dir), "input_ids": input_ids.tolist(), "fix_kv_size": fix_kv_size,
                   "threads": threads, "versions_out": str(Path(tmp) / "versions.json"),
                   "runs": [{"press": p, "mode": m, "out": out} for (p, m), out in files.items()]}
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of this environment over there
        env |= {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        side = subprocess.Popen([str(python), kvpress_side.__file__, str(Path(tmp) / "request.json")], env=env)
        try:
            ours = {p: read_ours(model, input_ids, compression_for(p, fix_kv_size)) for p in presses}
        except BaseException:
            side.kill()
            side.wait()
            raise
        if side.wait() != 0:
            raise RuntimeError(f"the kvpress side failed (exit {side.returncode}); its error is printed above")
        rows = [parity_row(p, m, ours[p], Reading(**torch.load(files[p, m])), input_ids, fix_kv_size)
                for p in presses for m in MODES]
        return rows, json.loads(Path(request["versions_out"]).read_text())
