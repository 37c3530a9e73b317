"""What every flow shares with Prefect: no retry of user errors, no traceback for them."""
from __future__ import annotations
import logging
from typing import Any
from pipeline.errors import FacemineError


def retry_unless_user_error(_task: Any, _task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn` of tasks with retries: a user error (bad setting, missing
    weights, unknown method) fails the same way on every try, so it is never retried."""
    return not isinstance(state.data, FacemineError)


class _UserErrorWithoutTraceback(logging.Filter):
    """Prefect logs every failure of a flow or task run with its traceback; for a user error the
    message says everything (the CLI prints it as one line), so the traceback is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FacemineError):
            record.exc_info = None
            record.exc_text = None
        return True


# Run loggers log through Prefect's adapters onto these two loggers; filters there see every record.
for _run_logger in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_run_logger).addFilter(_UserErrorWithoutTraceback())
