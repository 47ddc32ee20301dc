"""dvc.yaml's dependency lists: a job's numbers never go stale silently (in DVC, nor in the
runner's numbers fingerprint, which reads the same list), and a change to the report's
presentation reruns only the stages that draw or summarise."""

from pathlib import Path

import yaml

from knormpress.fingerprint import sources

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "knormpress"
PRESENTATION = {"agreement.py", "claims.py", "effects.py", "figures.py", "labels.py", "panels.py", "retrieval_figures.py",
                "summary.py", "seed.yaml", "kvpress_parity.py"}  # report/ only
# run by scripts, no job imports them: the kvpress parity check (scripts/kvpress_parity.py) and the engines'
# diagnostics (scripts/bench_engines.py)
TOOLS = (PACKAGE / "parity", PACKAGE / "diagnostics")


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_module_that_runs_a_job_is_a_dependency_of_every_experiment_stage():
    modules = [p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts]
    runs = [p for p in modules if not (p.parent.name == "report" and p.name in PRESENTATION) and not set(TOOLS) & set(p.parents)]
    experiments = {name: s for name, s in stages().items() if "run.py" in s["cmd"]}
    assert len(experiments) >= 3
    for name, stage in experiments.items():
        missing = [p.relative_to(ROOT).as_posix() for p in runs if not covered(p, stage["deps"])]
        assert not missing, f"stage {name} does not depend on {missing}"
        assert not any(covered(PACKAGE / "report" / f, stage["deps"]) for f in ("figures.py", "summary.py"))


def test_every_experiment_stage_shares_the_one_list_the_fingerprint_reads():
    experiments = [s for s in stages().values() if "run.py" in s["cmd"]]
    assert all(s["deps"] == sources() for s in experiments)


def test_the_plots_stage_depends_on_the_whole_report():
    deps = stages()["plots"]["deps"]
    for name in PRESENTATION:
        assert covered(PACKAGE / "report" / name, deps), name


def test_no_job_module_imports_the_tools():
    """What lets dvc.yaml leave src/knormpress/parity and src/knormpress/diagnostics out of the experiment
    stages' dependencies."""
    modules = [p for p in PACKAGE.rglob("*.py") if not set(TOOLS) & set(p.parents)]
    for tool in TOOLS:
        assert not [p.name for p in modules if f"knormpress.{tool.name}" in p.read_text()], tool.name
