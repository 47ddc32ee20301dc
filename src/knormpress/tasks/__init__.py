"""Evaluation tasks: the interface and registry (`base.py`) and the built-in tasks, `lm` (perplexity
and next-token accuracy), the retrieval tasks `passkey` and `needle`, and `diagnose` (key-norm and attention
statistics, attention recall), which register themselves."""

from knormpress.tasks import lm, retrieval  # noqa: F401  (the built-in tasks register themselves)
from knormpress.tasks import diagnose  # noqa: F401, I001  (last: its figures follow the others')
from knormpress.tasks.base import REGISTRY, TASKS, DatasetInfo, Outcome, Task, get_task, register_task

__all__ = ["REGISTRY", "TASKS", "DatasetInfo", "Outcome", "Task", "get_task", "register_task"]
