"""run.py's answer to a mistake: one line naming the nearest valid key, group or option, given
before the model (or torch, transformers, mlflow, matplotlib) loads."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "mlflow", "matplotlib")


def run_py(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -X importtime run.py ...` with tracking off: stderr holds the error line and every import."""
    return subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "run.py"), *overrides, "tracking.enabled=false",
                           f"hydra.run.dir={cwd}/run", "progress=false"], capture_output=True, text=True, cwd=cwd, timeout=120)


def imported(stderr: str) -> set[str]:
    """Top-level packages `-X importtime` saw imported."""
    return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", stderr, re.M)}


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["compres.keep_ratio=0.3"], "unknown key or config group 'compres'; choose one of cache, compress, dataset"),
        (["compres=keep_low"], "did you mean 'compress'?"),
        (["compress=keep_lo"], "unknown compress 'keep_lo'; choose one of h2o"),
        (["compress.keep_rati=0.3"], "unknown compress setting 'keep_rati'; choose one of fix_kv_size"),
        (["dataset=local_text", "dataset.path=no/such/books"], "found no files matching 'no/such/books'"),
        (["compress.keep_ratio=1.5"], "keep_ratio must lie in [0, 1], got 1.5"),
        (["compress.fix_kv_size=5000"], "compress.fix_kv_size=5000 is not smaller than the 2999 tokens"),
        (["model=hub"], "model.source.id has no value: give it on the command line, e.g. model.source.id=<value> "
                        "(a Hub id or a local folder; with no Hub: model=gemma3_270m, model=smollm2_135m"),
    ],
)
def test_a_mistake_is_one_line_before_any_heavy_import(overrides, words, tmp_path):
    done = run_py(*overrides, cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], done.stderr[-2000:]
    assert not set(HEAVY) & imported(done.stderr)


@pytest.mark.parametrize(
    "typo,nearest",
    [
        ("compres.keep_ratio=0.3", "compress"),  # a key
        ("compres=keep_low", "compress"),  # a group
        ("compress=keep_lo", "keep_low"),  # a group's option
        ("compress.keep_rati=0.3", "keep_ratio"),  # a setting of the spec
        ("evl.max_tokens=10", "eval"),
        ("eval.max_token=10", "max_tokens"),
        ("compress=h2o compress.strategy.normalis=sum", "normalise"),  # a strategy's own setting
        ("task=passkee", "passkey"),
    ],
)
def test_a_typo_names_the_nearest_choice(typo, nearest):
    from hydra import compose, initialize_config_dir

    from knormpress.cli import one_line
    from knormpress.config import CONF_DIR, validate

    overrides = typo.split()
    with pytest.raises(Exception) as error:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            validate(compose("config", overrides=overrides))
    assert one_line(error.value, overrides).endswith(f"did you mean {nearest!r}?") or \
        f"did you mean {nearest!r}? (in " in one_line(error.value, overrides)


def test_no_suggestion_when_nothing_is_close():
    from knormpress.errors import did_you_mean, unknown

    assert did_you_mean("zzz", ["keep_low", "keep_high"]) == ""
    assert str(unknown("compress", "xyz", ["h2o", "tova"])) == "unknown compress 'xyz'; choose one of h2o, tova"
