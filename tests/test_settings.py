"""A compression setting is declared once: a spec class with one more setting field gets its report
column (typed, filled for older runs), its run name part, its bench flag and its place in the
headline setting with no other edit."""

import argparse
from dataclasses import dataclass
from types import SimpleNamespace

import pandas as pd
import pytest
from report_data import DESIGN_TAGS

from knormpress.errors import ConfigError
from knormpress.report import runs as report_runs
from knormpress.report.headline import at_setting, task_setting
from knormpress.settings import _kind, add_flags, defaults, from_flags, name_parts, setting, settings_of
from knormpress.spec import Compression


@dataclass
class Extended(Compression):
    """The spec with a setting added the way a new one is: a field and its check."""

    extra: int = setting(0, "a setting only this test has", named="extra={}", before=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.extra, bool) or not isinstance(self.extra, int) or self.extra < 0:
            raise ConfigError(f"extra must be an integer >= 0, got {self.extra!r}")


def test_the_new_setting_is_a_report_column_read_from_its_param_and_typed():
    schema = report_runs.schema(Extended)
    assert schema.head == report_runs.schema(Compression).head + ["extra"]
    assert schema.params["extra"] == ["compress.extra"] and "extra" in schema.ints and schema.before["extra"] == 0
    run = SimpleNamespace(info=SimpleNamespace(run_id="r", start_time=1), data=SimpleNamespace(
        params={"compress.strategy.name": "keep_low", "compress.extra": "8", "compress.keep_ratio": "0.5"},
        tags={DESIGN_TAGS["role"]: "compressed"}, metrics={"ppl": 2.0}))
    row = report_runs._row(run, "e", DESIGN_TAGS, Extended)
    old = {"run_id": "o", "experiment": "e", "role": "compressed", "strategy": "keep_low", "keep_ratio": 0.5, "start_time": 0}
    table = report_runs.tidy(pd.DataFrame([row, old]), Extended).set_index("run_id")
    assert str(table.extra.dtype) == "Int64" and table.loc["r", "extra"] == 8
    assert table.loc["o", "extra"] == 0  # logged before the setting existed: what those runs computed
    assert "extra" not in report_runs.tidy(pd.DataFrame([report_runs._row(run, "e", DESIGN_TAGS)])).columns  # the spec's


def test_the_new_setting_names_runs_only_when_it_differs_from_its_default():
    assert Extended("h2o").label == Compression("h2o").label == "h2o kv=512 r=0.5"
    assert Extended("h2o", extra=8).label == "h2o kv=512 r=0.5 extra=8"
    assert name_parts(Compression(fix_kv_size=None, ratio=0.9, when="prefill")) == ["r=0.5", "ratio=0.9", "prefill"]
    with pytest.raises(ConfigError, match="extra must be an integer >= 0"):
        Extended(extra=-1)


def test_the_new_setting_is_a_bench_flag():
    parser = argparse.ArgumentParser()
    add_flags(parser, Extended)
    assert "--extra" in parser.format_help()
    args = parser.parse_args(["--extra", "16", "--skip-layers", "--ratio", "0.9", "--fix-kv-size", "null"])
    spec = from_flags(args, Extended, strategy="tova")
    assert (spec.extra, spec.skip_layers, spec.ratio, spec.fix_kv_size, spec.strategy.name) == (16, (), 0.9, None, "tova")
    assert from_flags(parser.parse_args([]), Extended) == Extended()  # every flag defaults to the spec's default
    with pytest.raises(ConfigError, match="extra must be"):
        from_flags(parser.parse_args(["--extra", "-3"]), Extended)


def test_the_new_setting_is_part_of_the_headline_setting():
    rows = [{"run_id": r, "experiment": "e", "role": "compressed", "strategy": "keep_low", "task": "lm", "extra": w,
             "start_time": i} | {k: str(list(v)) if k == "skip_layers" else v for k, v in defaults(Compression).items()}
            for i, (r, w) in enumerate((("plain", 0), ("more", 8)))]
    runs = report_runs.tidy(pd.DataFrame(rows), Extended)
    assert task_setting("lm", Extended)["extra"] == 0
    assert at_setting(runs, task_setting("lm", Extended), Extended).run_id.tolist() == ["plain"]
    assert at_setting(runs, task_setting("lm")).run_id.tolist() == ["plain", "more"]  # Compression knows no extra


def test_settings_come_from_the_fields_in_order_with_their_types():
    found = {s.name: (s.kind, s.sequence) for s in settings_of(Compression)}
    assert list(found)[:9] == ["fix_kv_size", "keep_ratio", "skip_layers", "sort_by_time", "n_sink", "positions",
                               "interval", "ratio", "when"]  # strategy is not a setting: the report and run names treat it apart
    assert found["fix_kv_size"] == (int, False) and found["ratio"] == (float, False) and found["skip_layers"] == (int, True)
    assert found["sort_by_time"] == (bool, False) and found["positions"] == (str, False)
    assert _kind("Mapping[str, Any]") == (object, False) and _kind(int | None) == (int, False) and _kind(bool) == (bool, False)
    assert [s.name for s in settings_of(Compression) if not s.headline] == ["n_sink"]
