"""run.py: the Hydra app, and how a user mistake reaches the terminal (one line on stderr, exit 2).

The job itself is `runner.run_job`; this module only starts it, turns SIGTERM into an orderly
exit (so open runs end FAILED) and prints mistakes without a traceback, naming the nearest key,
group or option to a typo. The config is checked (`config.validate`) before the runner, and with
it torch, transformers and mlflow, is imported: a mistake is reported about a second after start.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.contrib.logging import logging_redirect_tqdm

from knormpress.config import CONF_DIR, validate
from knormpress.errors import ConfigError, did_you_mean, unknown
from knormpress.sweeps import end_sweep

log = logging.getLogger("knormpress")


def main(cfg: DictConfig) -> dict[str, float] | None:
    """Hydra task function."""
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        validate(cfg)  # before the runner's imports (torch, transformers, mlflow: seconds)
        from knormpress.runner import Job, run_job
        from knormpress.tracking import show_progress

        job = Job.from_hydra()
        # with bars on, log lines are printed above them instead of through them
        with sigterm_raises(), logging_redirect_tqdm() if show_progress(bool(cfg.get("progress"))) else nullcontext():
            return run_job(cfg, job)
    except ConfigError as error:
        if not sweep:
            exit_with(error)  # SystemExit passes through Hydra, which would print more lines
        log.error("job failed: %s", error)  # the sweep re-raises only its first failure: say which one failed
        raise
    except Exception:
        if sweep:
            log.exception("job failed")
        raise


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM (kill, scancel, timeouts) into SystemExit while inside, so open runs end
    FAILED, not RUNNING; the previous handler comes back after (launcher workers outlive jobs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


NOT_IN_STRUCT = re.compile(r"Could not override '([\w.]+)'")
FULL_KEY = re.compile(r"full_key: ([\w.]+)")


def _unknown_key(error: Exception, overrides: list[str]) -> str | None:
    """Hydra refuses a key no YAML defines: name the keys (at the top, also the config groups) that
    exist where it was written, and the nearest one; for a strategy's or a task's setting, let the
    registry that builds the node say which settings exist."""
    found, missing = NOT_IN_STRUCT.search(str(error)), FULL_KEY.search(str(error.__cause__ or ""))
    if not found or not missing:
        return None
    key, path = found.group(1), missing.group(1)
    node, _, name = path.rpartition(".")
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key and not o.startswith("hydra")]
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            composed = compose("config", overrides=rest)
        if node in ("compress.strategy", "task"):
            return _unknown_setting(node, name, OmegaConf.to_container(OmegaConf.select(composed, node)))
        here = OmegaConf.select(composed, node) if node else composed
    except Exception:  # the composition fails for another reason: Hydra's own words will do
        return None
    if not isinstance(here, DictConfig):
        return None
    keys = set(here) | ({p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"} if not node else set())
    what = f"{node} setting" if node else "key or config group"
    return f"{unknown(what, name, sorted(keys))} (in {key!r})"


def _unknown_setting(node: str, setting: str, spec: dict) -> str | None:
    from knormpress.strategies import get_strategy
    from knormpress.tasks import get_task

    try:
        (get_strategy if node.startswith("compress") else get_task)({**spec, setting: None})
    except ConfigError as explained:
        return str(explained) + did_you_mean(setting, [k for k in spec if k != "name"])
    return None


def one_line(error: Exception, overrides: list[str] = ()) -> str:
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return str(unknown(group, name, sorted(error.options)))
    if explained := _unknown_key(error, list(overrides)):
        return explained
    if missing := re.search(r"Missing mandatory value: ([\w.]+)", str(error)):  # a `???` in a config: say which
        key = missing.group(1)
        offline = ", ".join(f"model={p.stem}" for p in sorted((CONF_DIR / "model").glob("*.yaml"))
                            if "kind: hub" not in p.read_text())
        hint = f" (a Hub id or a local folder; with no Hub: {offline})" if key == "model.source.id" else ""
        return f"{key} has no value: give it on the command line, e.g. {key}=<value>{hint}"
    lines = [str(e).strip().splitlines()[0].rstrip(".") for e in (error, error.__cause__) if e is not None and str(e).strip()]
    return ": ".join(lines) or type(error).__name__


def exit_with(error: Exception) -> None:
    print(f"error: {one_line(error, [a for a in sys.argv[1:] if not a.startswith('-')])}", file=sys.stderr)
    sys.exit(2)


def cli() -> None:
    """run.py: the Hydra app, printing a user mistake as one line on stderr (exit 2), not a traceback."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # errors reach the handler below instead of Hydra's printer
    status = "FAILED"
    try:
        with sigterm_raises():
            hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(main)()
        status = "FINISHED"
    except (ConfigError, HydraException, OmegaConfBaseException) as error:
        exit_with(error)
    finally:
        end_sweep(status)
