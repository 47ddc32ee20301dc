"""Each experiment stage's wall time: the newest sweep's span and summed run time from MLflow run
times (a fake client with hand-set times), written, read back and quoted in the summary's setup."""

from types import SimpleNamespace

from knormpress.report.timings import read_timings, sweep_timing, timing_lines, write_timing

TAG = "knormpress.sweep"
TAGS = {"sweep": TAG, "role": "knormpress.role"}


def run(start_s: float, end_s: float | None, sweep: str | None, role: str | None = "compressed"):
    tags = ({} if sweep is None else {TAG: sweep}) | ({} if role is None else {TAGS["role"]: role})
    info = SimpleNamespace(start_time=int(start_s * 1000), end_time=None if end_s is None else int(end_s * 1000))
    return SimpleNamespace(info=info, data=SimpleNamespace(tags=tags))


class Client:
    def __init__(self, runs):
        self.runs = runs

    def get_experiment_by_name(self, name):
        return SimpleNamespace(experiment_id="1") if name == "strategies" else None

    def search_runs(self, ids, query, max_results):
        assert ids == ["1"] and "FINISHED" in query
        return self.runs


def test_the_newest_sweep_is_timed_from_its_first_start_to_its_last_end():
    old = [run(0, 50, "sweep-a"), run(60, 400, "sweep-a")]
    new = [run(1000, 1100, "sweep-b"), run(1100, 1300, "sweep-b"), run(1300, 1310, "sweep-b"),
           run(990, 1400, "sweep-b", role=None), run(1400, None, "sweep-b")]  # the parent; a job without an end
    timing = sweep_timing(Client(old + new), "strategies", TAGS)
    assert timing == {"experiment": "strategies", "runs": 3, "span_s": 310.0, "run_s": 100.0 + 200.0 + 10.0}
    single = sweep_timing(Client([run(5, 65, None), run(0, 1, "sweep-a")]), "strategies", TAGS)
    assert (single["runs"], single["span_s"], single["run_s"]) == (1, 60.0, 60.0)
    assert sweep_timing(Client(new), "unknown", TAGS) is None and sweep_timing(Client([]), "strategies", TAGS) is None


def test_timings_are_written_read_back_and_quoted(tmp_path):
    rows = [{"experiment": "strategies", "runs": 3, "span_s": 600.0, "run_s": 540.0},
            {"experiment": "passkey", "runs": 2, "span_s": 120.0, "run_s": 90.0}]
    for row in rows:
        write_timing(row, tmp_path)
    assert read_timings(tmp_path) == sorted(rows, key=lambda r: r["experiment"])
    lines = timing_lines(read_timings(tmp_path))
    assert "12.0 min in all" in lines[0]
    assert lines[1] == "- experiment@passkey: 2.0 min from its first run's start to its last run's end (2 runs, 1.5 min inside them)"
    assert timing_lines([]) == [] and read_timings(tmp_path / "none") == []
