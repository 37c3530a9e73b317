"""`facemine serve`: register facemine's Prefect deployments and run their flows from this process.

- `mine-watch`: mines settings.serve.watch_folders on a schedule; only new or changed photos
  are processed (the mine flow skips photos stored unchanged).
- `cluster-scheduled`: embeds new faces and re-clusters on a schedule.
- `retrain`, `sweep`, `closed-loop`: no schedule; a person launches them from the Prefect UI, whose
  run form is generated from the flows' typed parameters (the server refuses invalid values).

GPU-heavy tasks of all these runs share the global concurrency limit of `flows.gpu`, which
`serve_deployments` creates (or updates) before serving.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from prefect import Flow, serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron, Interval, Schedule
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

from flows.cluster import cluster
from flows.gpu import GPU_SLOT
from flows.loop import closed_loop
from flows.mine import mine
from flows.sweep import sweep
from flows.train import retrain
from pipeline.errors import FacemineError
from storage.settings import Settings

logger = logging.getLogger(__name__)

TAGS = ["facemine"]
# A scheduled run that comes due while the previous one still runs is skipped (cancelled):
# the next one picks up whatever is new by then.
SKIP_IF_RUNNING = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
# A second closed loop launched while one runs waits for it.
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1)
START_SERVER_HINT = (
    "start one with `prefect server start --host 127.0.0.1` and "
    "`export PREFECT_API_URL=http://127.0.0.1:4200/api`"
)


@dataclass(frozen=True)
class ServePlan:
    deployments: list[RunnerDeployment]
    # Deployment name -> why it is not served.
    skipped: dict[str, str]


def schedules_for(cron: str | None, interval_seconds: int | None, timezone: str) -> list[Schedule]:
    """A cron schedule when `cron` is set, else an interval one, else none (launched by hand)."""
    if cron:
        try:
            return [Cron(cron, timezone=timezone)]
        except ValueError as error:
            raise FacemineError(f"invalid cron expression {cron!r}: {error}") from error
    if interval_seconds:
        return [Interval(interval_seconds, timezone=timezone)]
    return []


def _deployment(
    flow: Flow,
    name: str,
    schedules: list[Schedule],
    parameters: dict | None = None,
    concurrency: ConcurrencyLimitConfig | None = None,
) -> RunnerDeployment:
    return flow.to_deployment(
        name,
        schedules=schedules,
        parameters=parameters or {},
        concurrency_limit=concurrency,
        tags=TAGS,
        # Runs import the flow by module path: works from any folder once facemine is installed.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def build_deployments(settings: Settings) -> ServePlan:
    """The deployments `facemine serve` registers, from settings alone (no server needed).

    Raises FacemineError for a watch folder that does not exist or an invalid cron expression."""
    config = settings.serve
    deployments: list[RunnerDeployment] = []
    skipped: dict[str, str] = {}
    if config.watch_folders:
        folders = [str(Path(folder).expanduser().absolute()) for folder in config.watch_folders]
        missing = [folder for folder in folders if not Path(folder).is_dir()]
        if missing:
            raise FacemineError(f"watch folder not found: {missing[0]} (settings.serve.watch_folders)")
        schedules = schedules_for(config.mine_cron, config.mine_interval_seconds, config.timezone)
        parameters = {"folders": folders, "subset": config.watch_subset}
        deployments.append(_deployment(mine, "mine-watch", schedules, parameters, SKIP_IF_RUNNING))
    else:
        skipped["mine-watch"] = (
            "no watch folders configured: set FACEMINE_SERVE__WATCH_FOLDERS='[\"/path/to/photos\"]' "
            "or watch_folders under [serve] in facemine.toml"
        )
        logger.info("not serving mine-watch: %s", skipped["mine-watch"])
    schedules = schedules_for(config.cluster_cron, config.cluster_interval_seconds, config.timezone)
    deployments.append(_deployment(cluster, "cluster-scheduled", schedules, concurrency=SKIP_IF_RUNNING))
    # The UI's run form starts from the configured training parameters.
    training = {"config": settings.train.model_dump(mode="json")}
    deployments.append(_deployment(retrain, "retrain", [], training))
    deployments.append(_deployment(sweep, "sweep", [], {"configs": [training["config"]]}))
    deployments.append(_deployment(closed_loop, "closed-loop", [], training, ONE_AT_A_TIME))
    return ServePlan(deployments, skipped)


def describe_schedule(deployment: RunnerDeployment) -> str:
    if not deployment.schedules:
        return "launched by hand (UI or API)"
    schedule = deployment.schedules[0].schedule
    if getattr(schedule, "cron", None):
        return f"cron {schedule.cron} ({schedule.timezone or 'UTC'})"
    return f"every {int(schedule.interval.total_seconds())} s"


def server_api_url() -> str:
    """The API URL of a reachable Prefect server; a FacemineError says how to start one."""
    url = PREFECT_API_URL.value()
    if not url:
        raise FacemineError(f"PREFECT_API_URL is not set: `facemine serve` needs a Prefect server; {START_SERVER_HINT}")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise FacemineError(f"no Prefect server answers at {url} ({type(error).__name__}); {START_SERVER_HINT}")
    return url


def ui_url() -> str:
    """Where the Prefect UI is (derived from PREFECT_API_URL unless PREFECT_UI_URL is set)."""
    return PREFECT_UI_URL.value()


def ensure_gpu_limit(limit: int) -> None:
    """Create or update the active global concurrency limit that `flows.gpu.gpu_slot` takes."""
    with get_client(sync_client=True) as client:
        try:
            client.update_global_concurrency_limit(GPU_SLOT, GlobalConcurrencyLimitUpdate(limit=limit, active=True))
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=GPU_SLOT, limit=limit, active=True)
            )


def serve_deployments(plan: ServePlan, settings: Settings) -> None:
    """Register the deployments and run their flows until interrupted (schedules pause on exit).

    Needs a reachable server (`server_api_url` checks it with a clear message)."""
    ensure_gpu_limit(settings.serve.gpu_concurrency_limit)
    serve(*plan.deployments, print_starting_message=False)
