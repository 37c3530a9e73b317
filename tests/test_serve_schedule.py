"""`facemine serve`: the deployments it builds from settings, typed parameters, and, end to end
with a real Prefect server, a scheduled mine that processes only the photos added since its last run."""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from prefect.client.schemas.objects import ConcurrencyLimitStrategy
from prefect.exceptions import ParameterTypeError, PrefectHTTPStatusError
from prefect.utilities.callables import parameter_schema
from prefect_helpers import (
    NEVER_DURING_TESTS,
    api_client,
    deployment_runs,
    facemine_serve,
    free_port,
    prefect_env,
    prefect_server,
    read_deployment,
    wait_for,
)
from pydantic import ValidationError
from sqlalchemy import select

from conftest import DATA
from facemine_cli import main
from flows.cluster import cluster
from flows.mine import MineSummary, mine
from flows.serve import build_deployments, describe_schedule, schedules_for
from flows.train import retrain
from pipeline.config import TrainConfig
from pipeline.errors import FacemineError
from storage.schema import Image, PhotoPath, Subset
from storage.settings import ServeConfig, Settings
from storage.store import Store

MINE_INTERVAL_SECONDS = 20
RUN_TIMEOUT_SECONDS = 300
FIRST_PHOTOS = ["Hans_Blix/Hans_Blix_0001.jpg", "Laura_Bush/Laura_Bush_0001.jpg", "Tom_Ridge/Tom_Ridge_0001.jpg"]
ADDED_PHOTOS = ["Serena_Williams/Serena_Williams_0001.jpg", "Jack_Straw/Jack_Straw_0001.jpg"]


def by_name(settings: Settings) -> dict:
    return {deployment.name: deployment for deployment in build_deployments(settings).deployments}


def test_deployments_carry_schedules_and_parameters_from_settings(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    settings = Settings(
        data_dir=tmp_path / "data",
        serve=ServeConfig(
            watch_folders=[str(tmp_path / "inbox")],
            watch_subset="phone",
            mine_interval_seconds=600,
            cluster_cron="30 2 * * *",
            timezone="Europe/Paris",
        ),
        train=TrainConfig(epochs=3, margin=0.4),
    )
    deployments = by_name(settings)
    assert list(deployments) == ["mine-watch", "cluster-scheduled", "retrain", "sweep", "closed-loop"]

    watch = deployments["mine-watch"]
    assert watch.entrypoint == "flows.mine.mine"
    assert watch.parameters == {"folders": [str(tmp_path / "inbox")], "subset": "phone"}
    assert watch.schedules[0].schedule.interval == timedelta(seconds=600)
    assert watch.concurrency_limit == 1
    assert watch.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW

    clustering = deployments["cluster-scheduled"].schedules[0].schedule
    assert (clustering.cron, clustering.timezone) == ("30 2 * * *", "Europe/Paris")
    assert deployments["cluster-scheduled"].parameters == {}

    for name in ("retrain", "closed-loop"):
        deployment = deployments[name]
        assert deployment.schedules == [], f"{name} must be launched by hand"
        # The UI's run form starts from the configured training parameters.
        assert deployment.parameters["config"] == settings.train.model_dump(mode="json")
        assert deployment.enforce_parameter_schema
    # A sweep's form starts from one configuration: the configured one.
    assert deployments["sweep"].parameters == {"configs": [settings.train.model_dump(mode="json")]}
    assert deployments["sweep"].schedules == [] and deployments["sweep"].enforce_parameter_schema
    assert [describe_schedule(d) for d in deployments.values()] == [
        "every 600 s", "cron 30 2 * * * (Europe/Paris)", *["launched by hand (UI or API)"] * 3,
    ]


def test_mine_watch_is_left_out_without_watch_folders(tmp_path: Path) -> None:
    plan = build_deployments(Settings(data_dir=tmp_path))
    assert [d.name for d in plan.deployments] == ["cluster-scheduled", "retrain", "sweep", "closed-loop"]
    assert "FACEMINE_SERVE__WATCH_FOLDERS" in plan.skipped["mine-watch"]


def test_cron_wins_over_interval_and_neither_means_no_schedule() -> None:
    assert schedules_for("0 * * * *", 60, "UTC")[0].cron == "0 * * * *"
    assert schedules_for(None, 60, "UTC")[0].interval == timedelta(seconds=60)
    assert schedules_for(None, None, "UTC") == []


def test_bad_serve_settings_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(FacemineError, match="invalid cron expression 'every day'"):
        schedules_for("every day", None, "UTC")
    with pytest.raises(FacemineError, match=f"watch folder not found: {tmp_path / 'gone'}"):
        build_deployments(Settings(data_dir=tmp_path, serve=ServeConfig(watch_folders=[str(tmp_path / "gone")])))
    with pytest.raises(ValidationError, match="unknown time zone 'Mars/Olympus'"):
        ServeConfig(timezone="Mars/Olympus")
    with pytest.raises(ValidationError, match="greater than or equal to 10"):
        ServeConfig(mine_interval_seconds=1)


def test_flows_refuse_bad_parameters_with_a_clear_message() -> None:
    with pytest.raises(ParameterTypeError, match=r"shard_size: Input should be greater than or equal to 1"):
        mine.validate_parameters({"folders": ["/photos"], "shard_size": 0})
    with pytest.raises(ParameterTypeError, match=r"subset: Value error, a subset name cannot be empty"):
        mine.validate_parameters({"folders": ["/photos"], "subset": ""})
    with pytest.raises(ParameterTypeError, match=r"config\.epochs: Input should be greater than or equal to 1"):
        retrain.validate_parameters({"config": {"epochs": 0}})
    with pytest.raises(ParameterTypeError, match=r"config\.loss: Input should be 'arcface' or 'cosface'"):
        retrain.validate_parameters({"config": {"loss": "triplet"}})
    with pytest.raises(ParameterTypeError, match=r"subsets"):
        cluster.validate_parameters({"subsets": "not a list"})


def test_retrain_form_explains_every_parameter() -> None:
    schema = parameter_schema(retrain.fn).model_dump()
    described = {name for name, field in schema["properties"].items() if field.get("description")}
    train_fields = schema["definitions"]["TrainConfig"]["properties"]
    assert described == set(schema["properties"])
    assert all(field.get("description") for field in train_fields.values()), "a TrainConfig field lacks help text"


def test_serve_without_a_server_says_how_to_start_one(capsys: pytest.CaptureFixture[str]) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    nobody_listens = f"http://127.0.0.1:{free_port()}/api"
    for api_url, problem in ((None, "PREFECT_API_URL is not set"), (nobody_listens, "no Prefect server answers")):
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            assert main(["serve"]) == 2
        message = capsys.readouterr().err.strip()
        assert len(message.splitlines()) == 1, message
        assert problem in message and "prefect server start --host 127.0.0.1" in message, message


# ---- end to end: real server, `facemine serve`, scheduled mine ---------------------------------


def link_lfw_photos(folder: Path, names: list[str]) -> list[str]:
    """Symlinks in `folder` to LFW photos; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / Path(name).name).symlink_to(DATA / "lfw" / "images" / name)
    return [str(folder / Path(name).name) for name in names]


def processed_at(settings: Settings, subset: str) -> dict[str, datetime]:
    """When each photo of `subset` was last mined."""
    query = (
        select(PhotoPath.path, Image.processed_at)
        .join(Image, Image.id == PhotoPath.image_id)
        .join(Subset, Subset.id == PhotoPath.subset_id)
    )
    with Store(settings).session() as session:
        return dict(session.execute(query.where(Subset.name == subset)).all())


def completed_summaries(client, deployment_id) -> list[MineSummary]:  # noqa: ANN001
    """Results of the deployment's completed runs, in the order they ran."""
    runs = [run for run in deployment_runs(client, deployment_id) if run.state.is_completed()]
    return [run.state.result() for run in sorted(runs, key=lambda run: run.start_time)]


@pytest.mark.e2e
@pytest.mark.slow
def test_scheduled_mine_processes_only_photos_added_since_its_previous_run(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    watch = tmp_path / "watched-photos"
    first_paths = link_lfw_photos(watch, FIRST_PHOTOS)
    total = len(FIRST_PHOTOS) + len(ADDED_PHOTOS)
    settings = Settings(data_dir=tmp_path / "facemine-data")
    results = tmp_path / "flow-results"
    with prefect_server(tmp_path) as (api_url, home):
        env = prefect_env(
            home,
            api_url,
            FACEMINE_DATA_DIR=str(settings.data_dir),
            FACEMINE_SERVE__WATCH_FOLDERS=f'["{watch}"]',
            FACEMINE_SERVE__WATCH_SUBSET="inbox",
            FACEMINE_SERVE__MINE_INTERVAL_SECONDS=str(MINE_INTERVAL_SECONDS),
            FACEMINE_SERVE__CLUSTER_CRON=NEVER_DURING_TESTS,
            FACEMINE_SERVE__GPU_CONCURRENCY_LIMIT="2",
            # Keep flow results (MineSummary) where this test can read them back.
            PREFECT_RESULTS_PERSIST_BY_DEFAULT="true",
            PREFECT_LOCAL_STORAGE_PATH=str(results),
        )
        with facemine_serve(tmp_path, env) as serve_log, api_client(api_url) as client, \
                temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: results}):
            logs = [serve_log, tmp_path / "prefect-server.log"]
            deployment = wait_for(lambda: read_deployment(client, "mine/mine-watch"), 120, "mine-watch", logs)

            gpu_limit = client.read_global_concurrency_limit_by_name("facemine-gpu")
            assert (gpu_limit.limit, gpu_limit.active) == (2, True)

            # The server checks parameters against the flow's typed signature.
            refusal = "field 'shard_size'. Failure reason: 0 is less than the minimum of 1"
            with pytest.raises(PrefectHTTPStatusError, match=refusal):
                client.create_flow_run_from_deployment(deployment.id, parameters={"folders": [], "shard_size": 0})

            first = wait_for(lambda: completed_summaries(client, deployment.id), RUN_TIMEOUT_SECONDS,
                             "the first scheduled mine run to complete", logs)[0]
            assert first.photos_seen == first.photos_new == len(FIRST_PHOTOS) and first.photos_unchanged == 0, first
            before = processed_at(settings, "inbox")
            assert sorted(before) == sorted(first_paths)

            # Added in one atomic rename, so no run sees only some of them.
            link_lfw_photos(tmp_path / "staging" / "added", ADDED_PHOTOS)
            (tmp_path / "staging" / "added").rename(watch / "added")
            summaries = wait_for(
                lambda: (done := completed_summaries(client, deployment.id)) and done[-1].photos_seen == total and done,
                RUN_TIMEOUT_SECONDS, "a scheduled mine run that sees the added photos", logs,
            )

    seen_all = [summary for summary in summaries if summary.photos_seen == total]
    # The first run that saw the added photos mined exactly those; every photo was mined once.
    assert (seen_all[0].photos_new, seen_all[0].photos_unchanged) == (len(ADDED_PHOTOS), len(FIRST_PHOTOS))
    assert sum(summary.photos_new for summary in summaries) == total
    after = processed_at(settings, "inbox")
    assert len(after) == total
    assert {path: after[path] for path in before} == before, "photos mined before were processed again"
