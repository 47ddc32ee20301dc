"""The numbers fingerprint: which code and library versions computed a run's numbers, so that a
FINISHED run is reused (skipped, or taken as the baseline) only when today's code would compute
the same numbers.

What it covers: every file that dvc.yaml's experiment stages (the stages whose command runs
run.py, declared once as a `foreach` stage) depend on, plus the Python (major.minor), torch and
transformers versions. The list lives once, in dvc.yaml (the experiment stage's `deps`), and is read
from there: DVC 3 cannot interpolate a list into `deps` (it stops with "Cannot interpolate data of
type 'list'"), so dvc.yaml cannot take the list from a Python or params file, and a second copy
guarded by a test would still be two lists.
That list is deliberately wide: it also holds code that only logs or exports (tracking, sweeps,
the export) and `conf/` (whose effect on a run also reaches `config.config_hash`), so editing
those reruns jobs too, exactly when DVC reruns the stages.

"This edit does not move numbers" is decided by one rule that can only err towards rerunning: a
Python file counts as its syntax tree with docstrings removed (comments, blank lines, line breaks
and docstrings vanish; any other change counts, even one that happens not to move a number), a
YAML file as the data it parses to (comments and layout vanish), any other file as its bytes. The
tree's text form depends on the Python version, hence the Python version in the fingerprint.

It needs the source checkout (dvc.yaml beside src/, as conf/ is): without it, a tracked run stops
with a ConfigError that says so (`tracking.enabled=false` runs without MLflow and without it).
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

import yaml
from mlflow.entities import Run

from knormpress.errors import ConfigError
from knormpress.tracking import TAGS, tags

ROOT = Path(__file__).resolve().parents[2]  # the source checkout: dvc.yaml, run.py, conf/, src/
DVC_FILE = "dvc.yaml"
LIBRARIES = ("torch", "transformers")  # their versions change numerics
SHOWN = 4  # changed parts named in a rerun's log line


def experiment_stages(root: Path = ROOT) -> dict[str, dict]:
    """dvc.yaml's stages that run run.py, as written (a `foreach` stage: its `do` body)."""
    path = root / DVC_FILE
    if not path.is_file():
        raise ConfigError(f"cannot fingerprint the code that computes a run's numbers: no {path} (knormpress runs from "
                          f"its source checkout, `pip install -e .`); set tracking.enabled=false to run without MLflow")
    stages = {name: stage.get("do", stage) for name, stage in yaml.safe_load(path.read_text())["stages"].items()}
    return {name: stage for name, stage in stages.items() if "run.py" in str(stage["cmd"])}


def sources(root: Path = ROOT) -> list[str]:
    """The dependencies of dvc.yaml's experiment stages (those that run run.py), in file order."""
    path = root / DVC_FILE
    found: list[str] = []
    for stage in experiment_stages(root).values():
        found += [d for d in stage.get("deps", []) if d not in found]
    if not found:
        raise ConfigError(f"{path} has no stage that runs run.py with deps: nothing to fingerprint")
    return found


def _files(root: Path, deps: list[str]) -> list[Path]:
    files = []
    for dep in deps:
        path = root / dep
        if not path.exists():
            raise ConfigError(f"{root / DVC_FILE} lists {dep!r} as a dependency, but {path} does not exist")
        files += sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) if path.is_dir() else [path]
    return files


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:]
    return tree


def file_hash(path: Path) -> str:
    """What of a file counts (see the module docstring), hashed."""
    if path.suffix == ".py":
        content = ast.dump(_without_docstrings(ast.parse(path.read_bytes(), str(path)))).encode()
    elif path.suffix in (".yaml", ".yml"):
        content = json.dumps(yaml.safe_load(path.read_text()), default=str).encode()
    else:
        content = path.read_bytes()
    return hashlib.sha256(content).hexdigest()[:8]  # short: every file's hash rides in one MLflow tag


@dataclass(frozen=True)
class Fingerprint:
    """Library versions and per-file hashes (`parts`); their digest is what a reused run must match."""

    parts: dict[str, str]  # "python"/"torch"/"transformers" -> version; file path (from dvc.yaml's root) -> hash

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.parts, sort_keys=True).encode()).hexdigest()[:16]

    def tags(self) -> dict[str, str]:
        return tags(fingerprint=self.digest, fingerprint_parts=json.dumps(self.parts, separators=(",", ":")))

    def matches(self, run: Run) -> bool:
        return run.data.tags.get(TAGS["fingerprint"]) == self.digest

    def difference(self, run: Run) -> str:
        """Why `run` was computed by other code, e.g. "fingerprint a != b: src/knormpress/strategies/norms.py changed"."""
        digest = run.data.tags.get(TAGS["fingerprint"])
        if digest is None:
            return "no fingerprint: logged before runs carried one"
        old = json.loads(run.data.tags.get(TAGS["fingerprint_parts"], "{}"))
        said = [self._change(k, old) for k in sorted(self.parts.keys() | old.keys()) if self.parts.get(k) != old.get(k)]
        more = [f"{len(said) - SHOWN} more"] if len(said) > SHOWN else []
        return f"fingerprint {digest} != {self.digest}" + (f": {', '.join(said[:SHOWN] + more)}" if said else "")

    def _change(self, key: str, old: dict[str, str]) -> str:
        if key in ("python", *LIBRARIES):
            return f"{key} {old.get(key)} -> {self.parts.get(key)}"
        return f"{key} {'added' if key not in old else 'removed' if key not in self.parts else 'changed'}"


def compute(root: Path = ROOT) -> Fingerprint:
    """The fingerprint of the code under `root` and the installed libraries."""
    parts = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"} | {lib: version(lib) for lib in LIBRARIES}
    for path in _files(root, sources(root)):
        parts[path.relative_to(root).as_posix()] = file_hash(path)
    return Fingerprint(parts)


@lru_cache(maxsize=1)
def current() -> Fingerprint:
    """This process's fingerprint, computed once (the code it imported does not change while it runs)."""
    return compute()
