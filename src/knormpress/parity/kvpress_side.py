"""NVIDIA kvpress' side of the parity check (`knormpress.parity`): its presses read one text token by token.

kvpress 0.5.5 pins transformers < 5.3 and this project needs a newer one, so this file runs in a
separate environment, started by path with that environment's interpreter. It imports only torch,
transformers and kvpress (kvpress lazily, so its helpers can be tested without it), never knormpress:

    <kvpress env>/bin/python kvpress_side.py REQUEST.json

The request (JSON) names the model folder, the token ids, the budget B, the thread count and the
runs (press, mode, output file). Each run saves, with torch.save, {"logits": (T-1, vocab) float32,
"kept": (steps, layers, kv_heads, B) int32}: the positions each layer and KV head kept after each
pruning, ascending.

How kvpress prunes while decoding one token at a time (read from kvpress 0.5.5's source):
`DecodingPress(base_press=<Press>(), compression_interval=1, target_size=B)` used as a context
manager on the model. Its forward hook on every attention layer leaves the prefill call alone and,
after each decoding call, prunes the layer once `compression_interval` calls have passed, here after
every token: `ScorerPress.compress` keeps `scores.topk(n_kept)` with n_kept = int(k_len * (1 - r)),
the ratio r chosen so that n_kept = B. So the first B tokens go in one call, then one token per call
at its true position (`position_ids`), and after token t each layer holds B of tokens 0..t. Every
layer is pruned, there is no recent window, and the press scores the cache including token t
(TOVAPress always keeps the newest token). The model runs with SDPA attention, so TOVAPress takes
the current query's weights from its own `SnapKVPress.compute_window_attention` (window 1).

Modes:

* "stock": kvpress as installed. `ScorerPress.compress` runs unchanged; a wrapper only records what
  it kept (the topk of the same scores taken again, checked against the keys and values it kept).
  The kept entries stay in topk (score) order in the cache.
* "our tie rule": `ScorerPress.compress` is replaced, in this process only, by the same steps with
  knormpress' selection: the n_kept highest scores, the earlier position on a tie, the kept entries
  left in time order. KnormPress' norms are also rounded to 10 significant bits first, as knormpress'
  `key_norm` does, so that norms equal up to float rounding (rotary embedding preserves norms) tie.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

import torch

KVPRESS_VERSION = "0.5.5"  # the release whose hooks and selection this file drives and patches
PRESSES = {"knorm": "KnormPress", "tova": "TOVAPress", "keydiff": "KeyDiffPress"}
MODES = ("stock", "our tie rule")
NORM_BITS = 10


def round_bits(x: torch.Tensor, bits: int = NORM_BITS) -> torch.Tensor:
    """x rounded to `bits` significant bits (the mantissa in [0.5, 1) to a multiple of 2^-bits)."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.round(mantissa * 2**bits) / 2**bits, exponent)


def keep_by_tie_rule(scores: torch.Tensor, positions: torch.Tensor, n_kept: int) -> torch.Tensor:
    """Indices (..., n_kept) of the n_kept highest scores, the earlier position first among equal
    scores, returned in time order. scores, positions: (..., n)."""
    by_time = positions.argsort(dim=-1, stable=True)
    ranked = scores.gather(-1, by_time).argsort(dim=-1, descending=True, stable=True)[..., :n_kept]
    keep = by_time.gather(-1, ranked)
    return keep.gather(-1, positions.gather(-1, keep).argsort(dim=-1))


class Tracker:
    """The true position of every cached entry, per layer, and the positions kept at each pruning.

    kvpress' cache only knows its length, so the driver sets `now` (the position of the token the
    model is reading) before each call; entries the model appended since the last pruning are the
    newest positions, in order."""

    def __init__(self) -> None:
        self.now = 0
        self.positions: dict[int, torch.Tensor] = {}
        self.kept: dict[int, list[torch.Tensor]] = {}

    def cached(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """Positions (batch, kv_heads, n) of the layer's n cached entries."""
        b, h, n, _ = keys.shape
        known = self.positions.get(layer, torch.zeros(b, h, 0, dtype=torch.long))
        fresh = torch.arange(self.now + 1 - (n - known.shape[-1]), self.now + 1).expand(b, h, -1)
        return torch.cat([known, fresh], dim=-1)

    def pruned(self, layer: int, positions: torch.Tensor, indices: torch.Tensor) -> None:
        """Record that the layer kept `indices` of the entries at `positions`."""
        kept = positions.gather(-1, indices)
        self.positions[layer] = kept
        self.kept.setdefault(layer, []).append(kept[0].sort(dim=-1).values.to(torch.int32))

    def kept_tensor(self) -> torch.Tensor:
        """(steps, layers, kv_heads, B) kept positions, ascending."""
        return torch.stack([torch.stack(self.kept[layer]) for layer in sorted(self.kept)], dim=1)


def patch_compress(mode: str, tracker: Tracker):
    """Replace `ScorerPress.compress` for this process (see the module docstring); returns an undo."""
    from kvpress import KnormPress, ScorerPress
    from kvpress.utils import compute_n_kept

    stock = ScorerPress.compress

    def gathered(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return x.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))

    def recorded(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.compression_ratio == 0:
            return stock(self, module, hidden_states, keys, values, attentions, kwargs)
        positions = tracker.cached(module.layer_idx, keys)
        n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        if mode == "stock":
            kept_keys, kept_values = stock(self, module, hidden_states, keys, values, attentions, kwargs)
            indices = scores.topk(n_kept, dim=-1).indices
            if not (torch.equal(gathered(keys, indices), kept_keys) and torch.equal(gathered(values, indices), kept_values)):
                raise RuntimeError("could not record what kvpress kept: its topk differs from the scores' topk")
        else:
            if isinstance(self, KnormPress):
                scores = round_bits(scores)
            indices = keep_by_tie_rule(scores, positions, n_kept)
            kept_keys, kept_values = gathered(keys, indices).contiguous(), gathered(values, indices).contiguous()
        tracker.pruned(module.layer_idx, positions, indices)
        return kept_keys, kept_values

    ScorerPress.compress = recorded
    return lambda: setattr(ScorerPress, "compress", stock)


@torch.no_grad()
def run(model, input_ids: torch.Tensor, press_name: str, mode: str, fix_kv_size: int) -> dict[str, torch.Tensor]:
    """Read input_ids (1, T) with kvpress' press pruning each layer to fix_kv_size after every token."""
    import kvpress
    from transformers import DynamicCache

    tracker = Tracker()
    press = kvpress.DecodingPress(base_press=getattr(kvpress, PRESSES[press_name])(), compression_interval=1,
                                  target_size=fix_kv_size)
    undo = patch_compress(mode, tracker)
    T = input_ids.shape[1]
    calls = [(0, min(T - 1, fix_kv_size))] + [(t, t + 1) for t in range(min(T - 1, fix_kv_size), T - 1)]
    cache, logits = DynamicCache(), []
    try:
        with press(model):
            for start, stop in calls:
                tracker.now = stop - 1
                out = model(input_ids=input_ids[:, start:stop], past_key_values=cache,
                            position_ids=torch.arange(start, stop).unsqueeze(0), use_cache=True)
                logits.append(out.logits[0].float())
    finally:
        undo()
    return {"logits": torch.cat(logits), "kept": tracker.kept_tensor()}


def main(request_path: str) -> None:
    try:
        import kvpress  # noqa: F401
        import transformers
    except ImportError as e:
        sys.exit(f"kvpress_side: this interpreter cannot import kvpress ({e}); see knormpress.parity for the environment")
    if version("kvpress") != KVPRESS_VERSION:
        sys.exit(f"kvpress_side: drives kvpress {KVPRESS_VERSION}, found {version('kvpress')}")
    request = json.loads(open(request_path).read())
    torch.set_num_threads(request["threads"])
    model = transformers.AutoModelForCausalLM.from_pretrained(request["model_dir"], dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()
    input_ids = torch.tensor(request["input_ids"]).unsqueeze(0)
    for job in request["runs"]:
        torch.save(run(model, input_ids, job["press"], job["mode"], request["fix_kv_size"]), job["out"])
        print(f"kvpress_side: {job['press']} ({job['mode']}) done", flush=True)
    versions = {"kvpress": version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__}
    open(request["versions_out"], "w").write(json.dumps(versions))


if __name__ == "__main__":
    main(sys.argv[1])
