"""The kvpress parity check without kvpress: the tie rule and rounding put into kvpress are ours, the
position bookkeeping on kvpress' side, the kept-set counting, the PPL, our recording of kept sets,
and one clear line when the kvpress environment is missing."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import state_of, tiny_model

from knormpress.compression import Compression
from knormpress.engines import run_engine
from knormpress.errors import ConfigError
from knormpress.eviction import Budget, select
from knormpress.parity.compare import Reading, kept_set_differences, kvpress_version, parity_row, ppl, read_ours
from knormpress.parity.kvpress_side import Tracker, keep_by_tie_rule, round_bits
from knormpress.strategies import key_norm

ROOT = Path(__file__).resolve().parents[1]


def test_the_tie_rule_keeps_the_earlier_of_equal_scores_in_time_order():
    # cache order holds positions 3, 0, 4, 1, 2; scores by position: 0 -> 1, 1 -> 3, 2 -> 3, 3 -> 2, 4 -> 3
    positions = torch.tensor([[[3, 0, 4, 1, 2]]])
    scores = torch.tensor([[[2.0, 1.0, 3.0, 3.0, 3.0]]])
    # two slots, three scores of 3: positions 1 and 2 win (earlier), at cache indices 3 and 4
    assert keep_by_tie_rule(scores, positions, 2).tolist() == [[[3, 4]]]
    # four slots: positions 1, 2, 4 (score 3) and 3 (score 2), returned in time order 1, 2, 3, 4
    assert keep_by_tie_rule(scores, positions, 4).tolist() == [[[3, 4, 0, 2]]]


@pytest.mark.parametrize("seed", range(5))
def test_the_tie_rule_put_into_kvpress_is_ours(seed):
    """kvpress' side keeps what `select` keeps at keep_ratio 0, on scores full of exact ties and a
    cache in any order."""
    g = torch.Generator().manual_seed(seed)
    B, n = 12, 13
    scores = torch.randint(0, 4, (1, 3, n), generator=g).float()
    positions = torch.stack([torch.randperm(n, generator=g) + 40 for _ in range(3)]).unsqueeze(0)
    ours = select(scores, positions, 40 + n, Budget(B, 0.0), sort_by_time=True)
    assert torch.equal(keep_by_tie_rule(scores, positions, B), ours)


def test_round_bits_is_our_key_norm_rounding():
    assert round_bits(torch.tensor(1 + 2**-12)).item() == 1.0  # within 10 significant bits of 1
    assert round_bits(torch.tensor(1 + 2**-9)).item() == 1 + 2**-9
    keys = torch.randn(2, 3, 50, 64, generator=torch.Generator().manual_seed(0))
    norms = keys.norm(dim=-1)
    assert torch.equal(round_bits(norms), key_norm(keys))
    assert torch.equal(round_bits(-norms), -key_norm(keys))  # KnormPress scores are negative norms


def test_the_tracker_follows_positions_through_score_ordered_pruning():
    tracker = Tracker()
    tracker.now = 4  # after token 4 the layer holds positions 0..4
    keys = torch.zeros(1, 1, 5, 2)
    assert tracker.cached(7, keys).tolist() == [[[0, 1, 2, 3, 4]]]
    tracker.pruned(7, tracker.cached(7, keys), torch.tensor([[[4, 1, 2]]]))  # kept in score order
    tracker.now = 5  # token 5 appended after the three kept entries
    assert tracker.cached(7, torch.zeros(1, 1, 4, 2)).tolist() == [[[4, 1, 2, 5]]]
    tracker.pruned(7, tracker.cached(7, torch.zeros(1, 1, 4, 2)), torch.tensor([[[3, 0, 1]]]))
    assert tracker.kept_tensor().tolist() == [[[[1, 2, 4]]], [[[1, 4, 5]]]]  # (steps, layers, heads, B), ascending


def test_kept_sets_are_counted_per_step_layer_and_head():
    ours = torch.arange(3).view(1, 1, 1, 3).expand(4, 2, 2, 3).clone()  # 4 steps, 2 layers, 2 heads, B = 3
    theirs = ours.clone()
    assert kept_set_differences(ours, theirs, 10) == {"kept_sets_differ": 0, "kept_sets": 16, "first_difference": None}
    theirs[1, 1, 0, 2] = 7
    theirs[3, 0, 1, 0] = 9
    out = kept_set_differences(ours, theirs, 10)
    assert out == {"kept_sets_differ": 2, "kept_sets": 16,
                   "first_difference": {"after_token": 11, "layer": 1, "kv_head": 0}}
    with pytest.raises(ValueError, match="different shapes"):
        kept_set_differences(ours, theirs[:3], 10)


def test_ppl_is_exp_of_the_mean_next_token_nll():
    ids = torch.tensor([0, 1, 1, 0])
    assert ppl(torch.zeros(3, 5), ids) == pytest.approx(5.0)  # uniform over 5 tokens
    logits = torch.tensor([[0.0, math.log(3)]] * 3)  # p(1) = 3/4, p(0) = 1/4; targets 1, 1, 0
    expected = math.exp((2 * math.log(4 / 3) + math.log(4)) / 3)
    assert ppl(logits, ids) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("strategy", ["keep_low", "tova", "keydiff"])
def test_our_recorded_kept_sets_are_what_the_engine_kept(strategy, text_ids):
    """The last recorded set of every layer is the cache the engine ends with, and recording changes no logit."""
    model = tiny_model("llama")
    ids = text_ids[:60]
    comp = Compression(strategy, fix_kv_size=16, keep_ratio=0.0, skip_layers=(), interval=1)
    reading = read_ours(model, ids, comp)
    plain = run_engine(model, ids, comp, engine="streaming")
    assert reading.kept.shape == (60 - 1 - 16, 4, 2, 16)
    final = torch.stack([state_of(plain.cache, i).positions[0].sort(dim=-1).values for i in range(len(plain.cache.layers))])
    assert torch.equal(reading.kept[-1].long(), final)
    assert torch.equal(reading.logits, plain.logits)
    assert isinstance(reading, Reading)


def test_a_missing_kvpress_environment_is_one_line_naming_the_recipe(tmp_path):
    with pytest.raises(ConfigError, match="pip install kvpress==0.5.5 torch==2.13.0"):
        kvpress_version(tmp_path / "missing" / "python")
    fake = tmp_path / "python"  # an interpreter whose kvpress is another release
    fake.write_text("#!/bin/sh\necho 0.4.0\n")
    fake.chmod(0o755)
    with pytest.raises(ConfigError, match="has kvpress 0.4.0; this check drives kvpress 0.5.5"):
        kvpress_version(fake)
    if importlib.util.find_spec("kvpress") is None:  # the project's environment never has it
        with pytest.raises(ConfigError, match="has no kvpress"):
            kvpress_version(sys.executable)


def test_the_script_fails_in_one_line_without_the_kvpress_environment(tmp_path):
    done = subprocess.run([sys.executable, "scripts/kvpress_parity.py", "--kvpress-python", str(tmp_path / "python"),
                           "--out", str(tmp_path / "parity.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no kvpress environment at {tmp_path / 'python'}")
    assert "python3 -m venv ../kvpress-venv && ../kvpress-venv/bin/pip install kvpress==0.5.5 torch==2.13.0" in lines[0]
    assert not (tmp_path / "parity.jsonl").exists()


def test_a_row_splits_the_logit_difference_at_the_first_pruning():
    """Rows 0 .. first_step read an unpruned cache on both sides: their difference is the attention's
    arithmetic, not the selection's."""
    ids = torch.tensor([0, 1, 2, 3, 4, 5])
    kept = torch.zeros(2, 1, 1, 3, dtype=torch.int32)
    ours, theirs = torch.zeros(5, 6), torch.zeros(5, 6)
    theirs[1, 2], theirs[4, 0] = 1e-5, 0.5  # a rounding difference at row 1, a real one after pruning at row 4
    row = parity_row("knorm", "stock", Reading(ours, kept), Reading(theirs, kept), ids, first_step=3)
    assert row["max_abs_logit_diff"] == 0.5
    assert row["max_abs_logit_diff_unpruned"] == pytest.approx(1e-5)
    assert (row["press"], row["kvpress"], row["ours"], row["kept_sets_differ"]) == ("knorm", "KnormPress", "keep_low", 0)
