"""Keyed Prefect artifacts: what a flow run did, on the UI's Artifacts page (one history per key).

Each function is called inside a flow run, which the artifact is then linked to.
"""
from __future__ import annotations

import json

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from storage.reports import quality_rows

MINE_SUMMARY = "mine-summary"
MINE_QUALITY = "mine-quality"
CLUSTERING_SUMMARY = "clustering-summary"
EXPORT_CARD = "export-card"


def _value_rows(values: dict) -> list[dict]:
    return [
        {"": key, "value": json.dumps(value, default=str) if isinstance(value, dict | list) else value}
        for key, value in values.items()
    ]


def mine_artifacts(summary: dict, quality: dict) -> None:
    """The mine summary, and the quality report of the faces it found (how many each rule removed)."""
    create_table_artifact(
        key=MINE_SUMMARY,
        table=_value_rows(summary),
        description=f"Mining into subset `{summary['subset']}`: {summary['photos_seen']} photos seen, "
        f"{summary['faces_found']} new faces, {summary['faces_passed']} passed quality.",
    )
    create_table_artifact(
        key=MINE_QUALITY,
        table=quality_rows(quality, every_rule=True),
        description=f"Quality rules on the {quality['total']} new faces of subset `{summary['subset']}`: "
        f"{quality['failed']} removed, {quality['passed']} kept. A face can break several rules; "
        "'by this rule alone' counts faces that break no other.",
    )


def clustering_artifact(run: dict) -> None:
    """A clustering run's summary: method, model, subsets and its counts (`storage.identities.run_info`)."""
    subsets = ", ".join(run["subsets"]) or "all"
    create_table_artifact(
        key=CLUSTERING_SUMMARY,
        table=_value_rows({"run_id": run["id"], "method": run["method"], "model_id": run["model_id"],
                           "subsets": subsets, **run["stats"]}),
        description=f"Clustering run {run['id']} ({run['method']}, subsets: {subsets}): "
        f"{run['stats'].get('identities', 0)} identities from {run['stats'].get('faces', 0)} faces.",
    )


def export_card_artifact(export: dict) -> None:
    """A dataset export's card (`storage.exports.export_dataset`'s result) as markdown."""
    histogram = export.get("faces_per_identity_histogram", {})
    lines = [
        f"# Dataset export `{export['name']}` v{export['version']}",
        "",
        f"Export id {export['export_id']}, clustering run {export['run_id']}, "
        f"model {export['model']['id']} ({export['model']['name']}). Folder: `{export['path']}`",
        "",
        "| | value |",
        "|---|---|",
        *(f"| {key} | {export[key]} |" for key in
          ("identities", "faces", "train_faces", "val_faces", "duplicates_not_exported") if key in export),
        "",
        "| faces per identity | identities |",
        "|---|---|",
        *(f"| {bucket} | {count} |" for bucket, count in histogram.items()),
        "",
        f"Parameters: `{json.dumps(export.get('parameters', {}), sort_keys=True)}`",
    ]
    create_markdown_artifact(
        key=EXPORT_CARD,
        markdown="\n".join(lines),
        description=f"Dataset export {export['name']} v{export['version']}: "
        f"{export['identities']} identities, {export['faces']} faces.",
    )
