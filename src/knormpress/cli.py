"""run.py: the Hydra app, and how a user mistake reaches the terminal (one line on stderr, exit 2).

The job itself is `runner.run_job`; this module only starts it, turns SIGTERM into an orderly
exit (so open runs end FAILED) and prints mistakes without a traceback.
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
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.contrib.logging import logging_redirect_tqdm

from knormpress.config import CONF_DIR
from knormpress.errors import ConfigError, unknown
from knormpress.runner import Job, run_job
from knormpress.sweeps import end_sweep
from knormpress.tracking import show_progress

log = logging.getLogger("knormpress")


def main(cfg: DictConfig) -> dict[str, float] | None:
    """Hydra task function."""
    job = Job.from_hydra()
    try:  # with bars on, log lines are printed above them instead of through them
        with sigterm_raises(), logging_redirect_tqdm() if show_progress(bool(cfg.get("progress"))) else nullcontext():
            return run_job(cfg, job)
    except ConfigError as error:
        if not job.sweep:
            exit_with(error)  # SystemExit passes through Hydra, which would print more lines
        log.error("job failed: %s", error)  # the sweep re-raises only its first failure: say which one failed
        raise
    except Exception:
        if job.sweep:
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


NOT_IN_STRUCT = re.compile(r"Could not override '((compress\.strategy|task)\.(\w+))'")


def _unknown_setting(error: Exception, overrides: list[str]) -> str | None:
    """Hydra refuses a key no YAML defines; for a strategy's or a task's setting, let the registry
    that builds the node say which settings exist."""
    found = NOT_IN_STRUCT.search(str(error))
    if not found:
        return None
    key, node, setting = found.groups()
    from hydra import compose, initialize_config_dir

    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key and not o.startswith("hydra")]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            spec = OmegaConf.to_container(OmegaConf.select(compose("config", overrides=rest), node))
        from knormpress.strategies import get_strategy
        from knormpress.tasks import get_task

        (get_strategy if node.startswith("compress") else get_task)({**spec, setting: None})
    except ConfigError as explained:
        return str(explained)
    except Exception:  # the composition fails for another reason: Hydra's own words will do
        return None
    return None


def one_line(error: Exception, overrides: list[str] = ()) -> str:
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return str(unknown(group, name, sorted(error.options)))
    if explained := _unknown_setting(error, list(overrides)):
        return explained
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
