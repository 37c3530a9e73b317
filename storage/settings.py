"""One settings object for the whole of facemine.

Sources, highest priority first: explicit keyword arguments, environment variables
(`FACEMINE_` prefix, `__` between nested names, e.g. `FACEMINE_QUALITY__MIN_SHARPNESS=50`),
then a TOML config file (`FACEMINE_CONFIG`, else `./facemine.toml` when present).
A config file that cannot be read, or that names a section or key facemine does not have, is
a user error (`FacemineError`): a misspelt setting would otherwise be silently ignored.
"""
from __future__ import annotations

import difflib
import os
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pipeline.config import (
    ClusterConfig,
    DedupConfig,
    DetectConfig,
    EmbedConfig,
    ExportConfig,
    GateConfig,
    IngestConfig,
    QualityConfig,
    QueueConfig,
    TrainConfig,
)
from pipeline.errors import FacemineError, check_name

DEFAULT_SHARED_MODELS = Path(__file__).resolve().parent.parent.parent / "shared" / "models"


def _subset_name(text: str) -> str:
    try:
        return check_name(text, "a subset name")
    except FacemineError as error:
        raise ValueError(str(error)) from None  # pydantic reports ValueErrors as invalid input


# A subset name wherever one comes in (command line, flow parameters, settings).
SubsetName = Annotated[str, AfterValidator(_subset_name)]


class MineConfig(BaseModel):
    # Images per Prefect task: a shard is the unit of retries and atomic writes.
    shard_size: int = Field(default=1000, ge=1)
    task_retries: int = Field(default=2, ge=0)
    retry_delay_seconds: float = Field(default=2.0, ge=0.0)
    # Decode photos in this many threads while the models run.
    decode_workers: int = Field(default=2, ge=1)
    # Processes mining shards side by side; 0 = automatic: one (on Dask, one per Dask worker),
    # whose miner detects and embeds on a thread per core it may use (see
    # `pipeline.mining.Miner.compute_threads`), holding the models once: as fast as a process
    # per core and half the memory on 2 cores (benchmarks/mine_throughput.py).
    workers: int = Field(default=0, ge=0)


class ExecutionConfig(BaseModel):
    """Where a flow's fanned-out tasks (mining, embedding, per-subset clustering shards) run."""

    # "process": this machine (one worker in-process, or a process pool); "dask": a Dask cluster.
    task_runner: Literal["process", "dask"] = "process"
    # An existing Dask scheduler (`tcp://host:8786`) whose workers all see the data root and the
    # database; empty: a local Dask cluster is started for each run.
    dask_address: str = ""
    # Worker processes of that local cluster, and how many workers shards are spread over.
    dask_workers: int = Field(default=2, ge=1)
    # Dask worker resource that GPU tasks claim one of when the device is CUDA
    # (`dask worker --resources GPU=1` on GPU machines); CPU tasks run on any worker.
    gpu_resource: str = Field(default="GPU", min_length=1)


class ServeConfig(BaseModel):
    """Deployments of `facemine serve`: a cron expression, when set, wins over the interval;
    with neither, the deployment runs only when launched by hand."""

    # Folders the scheduled `mine-watch` deployment mines (new or changed photos only);
    # empty: no such deployment.
    watch_folders: list[str] = Field(default_factory=list)
    watch_subset: SubsetName = "watched"
    mine_cron: str | None = None
    mine_interval_seconds: int | None = Field(default=3600, ge=10)
    cluster_cron: str | None = None
    cluster_interval_seconds: int | None = Field(default=86400, ge=10)
    # IANA time zone the cron expressions are read in.
    timezone: str = "UTC"
    # GPU-heavy tasks (mining, embedding, training) running at once, across all flow runs.
    gpu_concurrency_limit: int = Field(default=1, ge=1)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"unknown time zone {name!r} (use an IANA name such as Europe/Paris)") from error
        return name


class ObjectStoreConfig(BaseModel):
    """How every machine reaches an object-storage data root (`data_root = "s3://bucket/prefix"`).
    Unset key and secret: s3fs's usual credential chain (AWS_* variables, ~/.aws, instance role),
    best outside tests: settings travel whole (to workers, into flow-run parameters), a secret too."""

    # An S3-compatible server other than AWS (MinIO, Ceph, the tests' moto server).
    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    # Further fsspec storage options, passed as they are (e.g. {"client_kwargs": {"region_name": "eu-west-1"}}).
    options: dict[str, Any] = Field(default_factory=dict)


class _CheckedTomlSource(TomlConfigSettingsSource):
    """The TOML config file, refused in one line when it is not UTF-8 TOML or names a setting
    that does not exist."""

    def _read_file(self, file_path: Path) -> dict[str, Any]:
        try:
            with file_path.open("rb") as file:
                values = tomllib.load(file)
        except UnicodeDecodeError as error:
            raise FacemineError(f"{file_path}: not UTF-8 text (byte {error.start})") from None
        except tomllib.TOMLDecodeError as error:
            raise FacemineError(f"{file_path}: not valid TOML: {error}") from None
        except OSError as error:
            raise FacemineError(f"{file_path}: cannot be read: {error.strerror}") from None
        unknown = _unknown_setting(values, Settings)
        if unknown:
            raise FacemineError(f"{file_path}: {unknown}")
        return values


def _unknown_setting(values: dict, model: type[BaseModel], section: str = "") -> str | None:
    """What in `values` is not a field of `model` (searched into nested sections), said for a person."""
    for key, value in values.items():
        field = model.model_fields.get(key)
        if field is None:
            close = difflib.get_close_matches(key, list(model.model_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if section:
                return f"unknown key {key!r} in section [{section}]{hint}"
            kind = "section" if isinstance(value, dict) else "key"
            return f"unknown {kind} {f'[{key}]' if kind == 'section' else repr(key)}{hint}"
        nested = field.annotation
        if isinstance(value, dict) and isinstance(nested, type) and issubclass(nested, BaseModel):
            found = _unknown_setting(value, nested, f"{section}.{key}" if section else key)
            if found:
                return found
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FACEMINE_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    data_dir: Path = Path("facemine-data")
    # Any SQLAlchemy URL; defaults to a SQLite file inside data_dir.
    database_url: str | None = None
    # Where chips, embedding shards and exports live, seen by every machine: a folder (a shared
    # mount) or an fsspec URL (s3://bucket/prefix). Default: data_dir. The database, logs and
    # Prefect's home stay in data_dir, on each machine.
    data_root: str | None = None
    object_store: ObjectStoreConfig = Field(default_factory=ObjectStoreConfig)
    shared_models_dir: Path = DEFAULT_SHARED_MODELS
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    detect: DetectConfig = Field(default_factory=DetectConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    mine: MineConfig = Field(default_factory=MineConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    review: QueueConfig = Field(default_factory=QueueConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        named = os.environ.get("FACEMINE_CONFIG")
        if named and not os.path.exists(named):
            raise FacemineError(f"FACEMINE_CONFIG names {named}, which does not exist")
        return init_settings, env_settings, _CheckedTomlSource(settings_cls, toml_file=Path(named or "facemine.toml"))

    @model_validator(mode="after")
    def _shared_root_needs_named_database(self) -> "Settings":
        # Machines sharing a data root must share its index: with one SQLite file per machine, each
        # machine's `doctor` would delete the others' chips and shards as unreferenced.
        if self.data_root_is_remote and self.database_url is None:
            raise FacemineError(
                f"data_root {self.data_root} is object storage: set database_url too (PostgreSQL for several "
                "machines; an explicit sqlite:/// file for one)"
            )
        return self

    @property
    def data_root_is_remote(self) -> bool:
        """Whether the data root is an fsspec URL other than a local folder."""
        return self.data_root is not None and "://" in self.data_root and not self.data_root.startswith("file://")

    @cached_property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'facemine.db').resolve()}"

    @property
    def models_dir(self) -> Path:
        # Trained weights go to a shared folder root, where every machine can load them; with an
        # object-storage root torch writes them here, and registering a model puts them on the
        # root (`Store.shared_weights`).
        if self.data_root is not None and not self.data_root_is_remote:
            return Path(self.data_root.removeprefix("file://")) / "models"
        return self.data_dir / "models"

    @property
    def prefect_home(self) -> Path:
        return self.data_dir / "prefect"

    def default_weights(self, model: str) -> Path | None:
        """Where a named embedder's weights come from unless a path is given."""
        if self.embed.weights and self.embed.model == model:
            return Path(self.embed.weights)
        if model == "sface":
            return self.shared_models_dir / "sface_2021dec_fp32.onnx"
        return None
