"""How long each experiment stage's sweep took, so that the study's growth is visible: the export
writes results/timings/<experiment>.json from the MLflow runs of the experiment's newest sweep (the
span from its first run's start to its last run's end, and the runs' summed durations), and the
summary quotes every stage's file. Model loading before a sweep's first run and the export itself
are not in the span; the jobs' own model loading between runs is."""

from __future__ import annotations

import json
from pathlib import Path

TIMINGS = "timings"  # in the results folder: one <experiment>.json per experiment stage


def sweep_timing(client, experiment: str, tags: dict[str, str]) -> dict | None:
    """The newest sweep of `experiment`: its FINISHED jobs' runs (a sweep's parent run has no role
    tag) that share the newest one's sweep tag (a single run is its own sweep); `tags`: field -> tag
    name (`knormpress.tracking.TAGS`). Returns runs, span_s and run_s; None without a finished run."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    sweep_tag = tags["sweep"]
    runs = [r for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=5000)
            if r.info.end_time is not None and tags["role"] in r.data.tags]
    if not runs:
        return None
    newest = max(runs, key=lambda r: r.info.start_time)
    sweep = newest.data.tags.get(sweep_tag)
    mine = [r for r in runs if r.data.tags.get(sweep_tag) == sweep] if sweep else [newest]
    start, end = min(r.info.start_time for r in mine), max(r.info.end_time for r in mine)
    return {"experiment": experiment, "runs": len(mine), "span_s": round((end - start) / 1000, 1),
            "run_s": round(sum(r.info.end_time - r.info.start_time for r in mine) / 1000, 1)}


def write_timing(timing: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / TIMINGS / f"{timing['experiment']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timing) + "\n")
    return path


def read_timings(results: str | Path) -> list[dict]:
    """Every stage's timing in `results`, by experiment name; none before an export wrote one."""
    return [json.loads(p.read_text()) for p in sorted((Path(results) / TIMINGS).glob("*.json"))]


def timing_lines(rows: list[dict]) -> list[str]:
    """Setup lines: per experiment stage, its sweep's wall time, then the total."""
    if not rows:
        return []
    lines = [f"- experiment@{r['experiment']}: {r['span_s'] / 60:.1f} min from its first run's start to its last "
             f"run's end ({r['runs']} runs, {r['run_s'] / 60:.1f} min inside them)" for r in rows]
    total = sum(r["span_s"] for r in rows)
    return [f"Wall time per experiment stage (results/{TIMINGS}/, written by each stage's export): "
            f"{total / 60:.1f} min in all", *lines]
