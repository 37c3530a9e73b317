"""Prefect wiring of the pipeline stages.

Prefect reads its settings at import time, so they are set here, before any flow module
imports prefect: its home lives inside facemine's data folder, telemetry is off.
"""
import logging
import os

from storage.settings import Settings

_prefect_home = Settings().prefect_home.resolve()
_prefect_home.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("PREFECT_HOME", str(_prefect_home))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# The ephemeral API starts in a subprocess; on a loaded 2-core machine the default 20 s is too short.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# The use cases (plain modules, no Prefect) log through `logging`: inside a flow their records go
# to the run's logs like a run logger's; outside one (CLI, tests) they are not meant for the API.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "usecases")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
logging.getLogger("usecases").setLevel(logging.INFO)  # as a run logger's (the root logger keeps WARNING)
