"""Evaluation tasks: the interface and registry (`base.py`) and the built-in tasks, `lm` (perplexity
and next-token accuracy) and the retrieval tasks `passkey` and `needle`, which register themselves."""

from knormpress.tasks import lm, retrieval  # noqa: F401  (the built-in tasks register themselves)
from knormpress.tasks.base import REGISTRY, TASKS, DatasetInfo, Outcome, Task, get_task, register_task

__all__ = ["REGISTRY", "TASKS", "DatasetInfo", "Outcome", "Task", "get_task", "register_task"]
