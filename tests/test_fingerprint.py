"""The numbers fingerprint: read from dvc.yaml's one list, blind to comments, docstrings and layout,
moved by any code change, refusing clearly outside a source checkout."""

import ast
import io
import shutil
import tokenize
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from knormpress.errors import ConfigError
from knormpress.fingerprint import DVC_FILE, ROOT, Fingerprint, compute, sources

STRATEGIES = "src/knormpress/strategies/norms.py"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of dvc.yaml and every file its experiment stages depend on."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copy(ROOT / DVC_FILE, root / DVC_FILE)
    for dep in sources():
        source, target = ROOT / dep, root / dep
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    return root


@pytest.fixture
def edit(checkout):
    """Rewrite one file of the copy for one test; the original comes back after it."""
    saved = {}

    def rewrite(rel: str, change) -> None:
        path = checkout / rel
        saved.setdefault(path, path.read_text())
        path.write_text(change(path.read_text()))

    yield rewrite
    for path, text in saved.items():
        path.write_text(text)


def reworded_docstrings(source: str) -> str:
    """Words added at the start of every docstring (module, classes, functions)."""
    lines = source.splitlines(keepends=True)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node, clean=False):
            literal = node.body[0].value
            line, at = lines[literal.lineno - 1], literal.col_offset
            while line[at] in "rRuU":  # a string prefix
                at += 1
            at += 3 if line[at:at + 3] in ('"""', "'''") else 1
            lines[literal.lineno - 1] = line[:at] + "Reworded. " + line[at:]
    return "".join(lines)


def commented_and_reflowed(source: str) -> str:
    """Comments added, blank lines added, one import wrapped in parentheses over two lines."""
    assert "from __future__ import annotations\n" in source
    source = source.replace("from __future__ import annotations\n", "from __future__ import (  # reflowed\n    annotations,\n)\n")
    return "# a new comment\n" + source.replace("\n\n\n", "\n\n\n\n") + "\n# a trailing comment\n"


def one_number_changed(source: str) -> str:
    """The first number literal in the code (not in a string) plus one: a one-token change."""
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NUMBER:
            row, col = token.start
            lines = source.splitlines(keepends=True)
            line = lines[row - 1]
            lines[row - 1] = line[:col] + repr(ast.literal_eval(token.string) + 1) + line[col + len(token.string):]
            return "".join(lines)
    raise AssertionError("no number in the file")


def test_the_fingerprint_covers_dvc_yamls_experiment_deps_and_the_libraries():
    parts = compute().parts
    assert set(parts) >= {"python", "torch", "transformers", "run.py", STRATEGIES, "conf/config.yaml"}
    assert "src/knormpress/report/figures.py" not in parts  # presentation: only the plots stage depends on it
    for dep in sources():
        assert dep in parts or any(p.startswith(dep + "/") for p in parts), dep


def test_docstring_comment_and_layout_edits_keep_it_and_a_one_token_change_moves_it(checkout, edit):
    before = compute(checkout)
    edit(STRATEGIES, reworded_docstrings)
    edit(STRATEGIES, commented_and_reflowed)
    edit("conf/compress/keep_low.yaml", lambda text: f"# a comment\n\n{text}\n")
    assert (checkout / STRATEGIES).read_text() != (ROOT / STRATEGIES).read_text()
    assert compute(checkout).digest == before.digest
    edit(STRATEGIES, one_number_changed)
    after = compute(checkout)
    assert after.digest != before.digest
    assert after.difference(run(before)) == f"fingerprint {before.digest} != {after.digest}: {STRATEGIES} changed"


def test_a_changed_config_value_moves_it(checkout, edit):
    before = compute(checkout)
    edit("conf/eval/default.yaml", lambda text: yaml.safe_dump(yaml.safe_load(text) | {"seed": 12345}))
    assert compute(checkout).digest != before.digest


def test_outside_a_source_checkout_it_refuses_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"no .*dvc.yaml \(knormpress runs from its source checkout.*tracking.enabled=false"):
        compute(tmp_path)
    (tmp_path / DVC_FILE).write_text(yaml.safe_dump({"stages": {"s": {"cmd": "python run.py", "deps": ["gone.py"]}}}))
    with pytest.raises(ConfigError, match="lists 'gone.py' as a dependency"):
        compute(tmp_path)


def run(fingerprint: Fingerprint | None) -> SimpleNamespace:
    """What `matches` and `difference` read of an MLflow run: its tags."""
    return SimpleNamespace(data=SimpleNamespace(tags={} if fingerprint is None else fingerprint.tags()))


def test_the_difference_names_libraries_and_files():
    old = Fingerprint({"python": "3.11", "torch": "2.4.0", "transformers": "5.0.0", "a.py": "1", "b.py": "2"})
    new = Fingerprint({"python": "3.11", "torch": "2.13.0", "transformers": "5.0.0", "a.py": "1", "c.py": "3"})
    assert old.matches(run(old)) and not new.matches(run(old)) and not new.matches(run(None))
    assert new.difference(run(old)) == f"fingerprint {old.digest} != {new.digest}: b.py removed, c.py added, torch 2.4.0 -> 2.13.0"
    assert new.difference(run(None)) == "no fingerprint: logged before runs carried one"
    many = Fingerprint(old.parts | {f"f{i}.py": "x" for i in range(6)})
    assert many.difference(run(old)).endswith("f3.py added, 2 more")


def test_its_tags_fit_mlflow():
    assert len(compute().tags()["knormpress.fingerprint_parts"]) < MAX_TAG_VAL_LENGTH / 2  # room for the package to grow
