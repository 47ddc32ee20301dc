"""dvc.yaml's dependency lists: a job's numbers never go stale silently (in DVC, nor in the
runner's numbers fingerprint, which reads the same list), and a change to the report's
presentation reruns only the stages that draw or summarise."""

from pathlib import Path

import yaml

from knormpress.fingerprint import experiment_stages, sources

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "knormpress"
PRESENTATION = {"agreement.py", "claims.py", "effects.py", "figures.py", "labels.py", "panels.py", "retrieval_figures.py",
                "summary.py", "diagnose_figures.py", "diagnose_summary.py", "claims.yaml", "kvpress_parity.py", "sweep_figure.py",
                "study_headline.py", "blocks.py", "engine_tables.py", "first_run.py", "offline_plots.py"}  # report/ only; the last four: the docs' generated blocks
# run by scripts, no job imports them: the kvpress parity check (scripts/kvpress_parity.py); diagnostics/ is a
# dependency (the diagnose task runs it), its engine agreement check included
TOOLS = (PACKAGE / "parity",)


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_module_that_runs_a_job_is_a_dependency_of_every_experiment_stage():
    modules = [p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts]
    runs = [p for p in modules if not (p.parent.name == "report" and p.name in PRESENTATION) and not set(TOOLS) & set(p.parents)]
    experiments = experiment_stages()
    assert list(experiments) == ["experiment"]  # one foreach stage runs every preset
    for name, stage in experiments.items():
        missing = [p.relative_to(ROOT).as_posix() for p in runs if not covered(p, stage["deps"])]
        assert not missing, f"stage {name} does not depend on {missing}"
        assert not any(covered(PACKAGE / "report" / f, stage["deps"]) for f in ("figures.py", "summary.py"))


def test_every_experiment_stage_shares_the_one_list_the_fingerprint_reads():
    assert [s["deps"] for s in experiment_stages().values()] == [sources()]


def test_the_experiment_stage_runs_every_preset_but_the_hub_one():
    presets = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    assert set(stages()["experiment"]["foreach"]) == presets - {"paper"}  # paper needs the HuggingFace Hub


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
