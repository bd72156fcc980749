"""What a run tells its user: the model card of a registered version and the one-screen result
of a run (trained, or nothing to do), as markdown. Plain functions over the run summary and the
files the stages wrote; publishing them (MLflow, Prefect artifacts) is done by thin tasks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import pandas as pd
from prefect import task

from petalflow.tasks.common import counted, redact_url
from petalflow.tasks.dataset import (
    SHOWN_REASONS, alike_names_note, load_manifest, reasons_by_kind, split_layout_note,
    tucked_classes_note,
)
from petalflow.tasks.drift import drift_line, inputs_said
from petalflow.tasks.registry import model_said


def artifact_key(prefix: str, model_name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) stable per model name."""
    slug = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-") or "model"
    return f"{prefix}-{slug}"[:100]


def mlflow_links(base: str, run_id: Optional[str], experiment_id: Optional[str],
                 model_name: str, version: Optional[str]) -> dict:
    """Links into the MLflow UI at ``base``: its address, or "." for links relative to a page
    of that UI (they work whatever address the reader opened it at)."""
    base = base.rstrip("/")
    links = {}
    if run_id and experiment_id:
        links["MLflow run"] = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    if version:
        links["Model version"] = f"{base}/#/models/{model_name}/versions/{version}"
    if run_id:  # where the UI fetches a run's artifacts
        links["Confusion matrix"] = (f"{base}/get-artifact?path=evaluation%2Fconfusion.png"
                                     f"&run_uuid={run_id}")
    return links


def run_links(summary: dict) -> tuple[dict, dict]:
    """Links to the run, the model version and the confusion matrix in the MLflow UI: at the
    tracking server's address (none without a server), and relative to a page of whichever UI
    shows the store (a version's description: a server, `mlflow ui`)."""
    from petalflow.tasks.registry import mlflow_client, tracking_uri

    uri = tracking_uri()
    run_id = summary.get("mlflow_run_id")
    experiment_id = mlflow_client().get_run(run_id).info.experiment_id if run_id else None
    found = (run_id, experiment_id, summary["model_name"], summary.get("model_version"))
    served = uri.lower().startswith(("http://", "https://"))
    return (mlflow_links(uri, *found) if served else {}), mlflow_links(".", *found)


def _table(frame: pd.DataFrame) -> str:
    from petalflow.tasks.evaluate import markdown_table

    return markdown_table(frame)


def class_counts(manifest_path: str) -> pd.DataFrame:
    """Images per class and split (train/val/test/quarantined) from the run's manifest."""
    manifest = load_manifest(Path(manifest_path))
    manifest["column"] = manifest["split"].where(manifest["status"] == "ok", "quarantined")
    table = pd.crosstab(manifest["label"], manifest["column"])
    for col in ("train", "val", "test", "quarantined"):
        if col not in table:
            table[col] = 0
    table = table[["train", "val", "test", "quarantined"]]
    return table.rename_axis(None, axis=1).reset_index().rename(columns={"label": "class"})


def _source_lines(source: dict) -> list[str]:
    lines = [f"- Source: `{redact_url(source.get('url'))}` ({source.get('kind')})"]
    if source.get("sha256"):
        lines.append(f"- Archive sha256: `{source['sha256']}`")
    if source.get("kind") == "http":
        lines.append(f"- ETag: `{source.get('etag') or 'none sent'}`; Last-Modified: "
                     f"`{source.get('last_modified') or 'none sent'}`; this run: "
                     f"{source.get('outcome') or 'unknown'}")
    if source.get("redirected_to"):
        lines.append(f"- The URL redirected to `{source['redirected_to']}`")
    if source.get("listing_fingerprint"):
        lines.append(f"- Folder listing fingerprint: `{source['listing_fingerprint']}`")
    return lines


def _comparison_lines(summary: dict) -> list[str]:
    comparison = summary.get("comparison") or {}
    acc = summary["test_metrics"]["test_accuracy"]
    lines = ["## Champion comparison", ""]
    champ = comparison.get("champion_accuracy")
    if champ is None:
        lines.append(f"- No like-for-like figure: {comparison.get('basis', 'no champion')}.")
        lines.append(f"- This version: test accuracy {acc:.4f}.")
    else:
        lines += [
            f"Both measured on {comparison.get('basis')}, same code path:",
            "",
            "| model | test accuracy |",
            "|---|---|",
            f"| this version (v{summary['model_version']}) | "
            f"{comparison.get('accuracy', acc):.4f} |",
            f"| champion v{comparison.get('champion_version')} | {champ:.4f} |",
        ]
    lines += ["", f"**Decision: {summary['alias']}** — {summary['alias_reason']}", ""]
    return lines


def model_card(summary: dict, evaluation_dir: str, links: Optional[dict] = None,
               image_url: str = "evaluation/confusion.png") -> str:
    """The model card of a registered version: data source and validators, fingerprint, images
    per class, quarantined files by reason, per-class metrics, confusion matrix, the champion
    comparison and the decision."""
    from petalflow.tasks.evaluate import accuracy_sentence

    ds = summary["dataset"]
    metrics = summary["test_metrics"]
    evaluation = Path(evaluation_dir)
    lines = [
        f"# Model card: {summary['model_name']} version {summary['model_version']}",
        "",
        f"**{summary['alias']}** — {summary['alias_reason']}",
        "",
    ]
    for name, url in (links or {}).items():
        lines.append(f"- [{name}]({url})")
    lines += ["", "## Data", ""]
    lines += _source_lines(summary.get("source") or {})
    lines += [
        f"- Dataset fingerprint: `{ds['fingerprint']}`",
        f"- Files: {ds['found']} found = {ds['used']} used + {ds['quarantined']} quarantined; "
        f"splits {ds.get('splits')}",
        "",
        "### Images per class",
        "",
        _table(class_counts(summary["manifest"])),
        "",
    ]
    reasons = reasons_by_kind(ds)
    if reasons:
        lines += ["### Quarantined files by reason", "",
                  _table(pd.DataFrame(list(reasons.items()), columns=["reason", "files"])), ""]
        examples = list(ds["quarantine_reasons"].items())[:SHOWN_REASONS]
        if len(examples) < ds["quarantined"]:
            lines += [f"{len(examples)} of the {ds['quarantined']} quarantined files (every "
                      "file's reason is in the run's manifest):", ""]
        lines += [f"- `{p}`: {r}" for p, r in examples]
        lines.append("")
    if ds.get("empty_class_folders"):
        lines += [f"Skipped folders without images: {', '.join(ds['empty_class_folders'])}", ""]
    for note in (split_layout_note(ds), tucked_classes_note(ds),
                 alike_names_note(ds.get("classes") or [])):
        if note:
            lines += [note[0].upper() + note[1:] + ".", ""]
    lines += _comparison_lines(summary)
    lines += [
        "## Test metrics",
        "",
        accuracy_sentence(metrics),
        "",
    ]
    per_class = evaluation / "per_class.csv"
    if per_class.exists():
        from petalflow.tasks.evaluate import majority_baseline, majority_line, read_per_class

        table = read_per_class(per_class)
        lines += [majority_line(majority_baseline(table)), "", _table(table.round(4)), ""]
    confusion = evaluation / "confusion.csv"
    if confusion.exists():
        from petalflow.tasks.evaluate import confusion_markdown

        frame = pd.read_csv(confusion, index_col=0, dtype=str, keep_default_na=False)
        lines += ["## Confusion matrix", "", f"![confusion matrix]({image_url})", "",
                  *confusion_markdown(frame.astype(int)), ""]
    advice = _advice(summary)
    if advice:
        lines += ["## Training", "", f"Epochs: {advice}.", ""]
    lines += _edge_lines(summary)
    return "\n".join(lines)


def _advice(summary: dict) -> Optional[str]:
    """What the head's validation loss said about its number of epochs (``epochs_advice``)."""
    return (summary.get("training") or {}).get("advice")


def shortened_card(card: str, limit: int) -> str:
    """``card`` itself when it has at most ``limit`` characters; else its opening (title,
    decision, links) and its ``## `` sections in order, each whole if it fits, else its lead
    (the lines before its first table or subsection) if that fits, closed by a line naming
    what was left out and where the whole card is (the run's ``model_card.md``)."""
    if len(card) <= limit:
        return card
    head, *rest = card.split("\n## ")
    sections = ["## " + s for s in rest]
    titles = [s.splitlines()[0][3:].strip() for s in sections]

    def note(left_out: list[str]) -> str:
        return (f"\n\n*Left out here (the registry keeps {limit:,} characters of a "
                f"description): {'; '.join(left_out) or 'the rest'}. The whole card is the "
                "version's run artifact `model_card.md`.*")

    worst = note([f"{t} (its tables)" for t in titles])
    if len(head) + len(worst) > limit:  # not even the opening fits: cut it
        return head[:max(0, limit - len(worst))] + note(titles)
    kept, left_out = [head], []
    budget = limit - len(head) - len(worst)
    for title, section in zip(titles, sections):
        lines = section.splitlines()
        cut = next((i for i, line in enumerate(lines)
                    if i and (line.startswith("|") or line.startswith("#"))), len(lines))
        lead = "\n".join(lines[:cut]).rstrip() + "\n"
        if len(section) < budget:  # each kept part costs its length and a line break
            part, missing = section, None
        elif len(lead) < budget:
            part, missing = lead, f"{title} (its tables)"
        else:
            part, missing = "", title
        if part:
            kept.append(part)
            budget -= len(part) + 1
        if missing:
            left_out.append(missing)
    return "\n".join(kept).rstrip() + note(left_out)


def _edge_lines(summary: dict) -> list[str]:
    """The edge models beside the SavedModel: test accuracy, size, latency, how to get one."""
    rows = summary.get("edge")
    if not rows:
        return []
    return ["## Edge models (TensorFlow Lite)", "",
            _table(pd.DataFrame(rows)), "",
            "Latency: ms per image file (decode, resize, classify), batch 1, one thread. "
            f"`petalflow pull --model models:/{summary['model_name']}/{summary['model_version']} "
            "--format tflite --dest DIR` fetches the int8 model with labels.txt, edge.json and "
            "edge_input.py (`model_input(path, size)`: its input from an image file, with numpy "
            "and Pillow only).",
            ""]


def run_result(summary: dict, links: Optional[dict] = None) -> str:
    """One screen for the run the user started: what happened and where to look next."""
    from petalflow.tasks.evaluate import interval_words

    status = summary["status"]
    lines = [f"# {summary['model_name']}: {status}", ""]
    if status == NO_CHAMPION:
        return "\n".join([*lines, f"Nothing was trained: {summary['reason']}.", ""])
    if status == "nothing to do" and summary.get("alias") == "challenger":
        lines += [f"Nothing was trained: {summary['alias_reason']}. Set **force** to retrain "
                  "anyway.", ""]
    elif status == "nothing to do":
        lines += [
            f"Champion version {summary['model_version']} was trained on this data "
            "(same dataset fingerprint) with these training parameters, so nothing was "
            "trained. Set **force** to retrain anyway.",
            "",
        ]
    else:
        acc = summary["test_metrics"]["test_accuracy"]
        lines += [
            f"- Registered **version {summary['model_version']}** as **{summary['alias']}**",
            f"- Decision: {summary['alias_reason']}",
            f"- Test accuracy {acc:.4f} on {summary['test_metrics']['test_images']} images"
            f"{interval_words(summary['test_metrics'])}, "
            f"macro F1 {summary['test_metrics']['test_macro_f1']:.4f}",
        ]
        advice = _advice(summary)
        if advice:
            lines.append(f"- Epochs: {advice}")
    ds = summary["dataset"]
    lines.append(f"- Data: {ds['found']} files found, {ds['used']} used, "
                 f"{ds['quarantined']} quarantined; fingerprint `{ds['fingerprint'][:12]}`")
    src = summary.get("source") or {}
    if src:
        lines.append(f"- Source `{redact_url(src.get('url'))}`: "
                     f"{src.get('outcome') or src.get('kind')}")
    for name, url in (links or {}).items():
        lines.append(f"- [{name}]({url})")
    if summary.get("edge"):
        lines += [""] + _edge_lines(summary)
    if summary.get("timings"):
        from petalflow.tasks.timing import markdown

        lines += ["", "## Time per phase", "", markdown(summary["timings"])]
    return "\n".join(lines) + "\n"


NO_CHAMPION = "no champion"  # the status of a run that follows the champion when there is none


def nothing_to_follow(model_name: str) -> dict:
    """The summary of a run that follows the champion (``follow_champion``) of a model that
    has none yet, nor a challenger: nothing to retrain, and how to train the first model."""
    return {"status": NO_CHAMPION, "model_name": model_name, "model_version": None,
            "reason": (f"{model_name} has no champion to follow yet (nor a challenger, "
                       "a version below the gate): train its first model "
                       "with follow_champion off and its data URL (the train deployment, "
                       "petalflow train); runs that follow the champion then keep it current")}


def state_message(summary: dict) -> str:
    """The final state's message: what ``prefect deployment run --watch`` and the UI show."""
    if summary["status"] == NO_CHAMPION:
        return f"nothing to do: {summary['reason']}"
    if summary["status"] == "nothing to do" and summary.get("alias") == "challenger":
        return f"nothing to do: {summary['alias_reason']} (set force to retrain)"
    if summary["status"] == "nothing to do":
        return (f"nothing to do: champion v{summary['model_version']} of "
                f"{summary['model_name']} was trained on this data with these parameters "
                "(set force to retrain)")
    return (f"registered {summary['model_name']} v{summary['model_version']} as "
            f"{summary['alias']}: {summary['alias_reason']}")


@task(name="start-progress")
def start_progress_task(model_name: str) -> str:
    """A progress artifact on the run the user started; the training step (possibly another
    flow run on the gpu pool) updates it by id."""
    from prefect.artifacts import create_progress_artifact

    return str(create_progress_artifact(
        progress=0.0, key=artifact_key("training-progress", model_name),
        description=f"Training {model_name}: epochs completed (%)"))


@task(name="publish-result")
def publish_result_task(summary: dict, evaluation_dir: Optional[str] = None) -> dict:
    """Model card (MLflow run + version description + Prefect artifact) and run result
    (Prefect artifact) for the run the user started. Returns the links it used."""
    from prefect.artifacts import create_markdown_artifact

    from petalflow.tasks.registry import DESCRIPTION_LIMIT, log_model_card
    from petalflow.tasks.space import disk_full_said

    name = summary["model_name"]
    links, in_ui = run_links(summary)
    if summary["status"] == "trained" and evaluation_dir:
        # The run's model_card.md sits beside evaluation/ (a relative link); the version's
        # description is read in the MLflow UI, whose links and image are relative to it
        # (they work at any address, and in `mlflow ui` on the SQLite store); the Prefect
        # artifact's image where it can be fetched: the tracking server, else the file.
        card = model_card(summary, evaluation_dir, links)
        shown = model_card(summary, evaluation_dir, in_ui, in_ui["Confusion matrix"])
        with disk_full_said("logging the model card"):
            log_model_card(summary, card, shortened_card(shown, DESCRIPTION_LIMIT))
        image = links.get("Confusion matrix") or (
            Path(evaluation_dir, "confusion.png").resolve().as_uri())
        create_markdown_artifact(markdown=model_card(summary, evaluation_dir, links, image),
                                 key=artifact_key("model-card", name),
                                 description=f"Model card of {name} v{summary['model_version']}")
    create_markdown_artifact(markdown=run_result(summary, links),
                             key=artifact_key("train-result", name),
                             description=state_message(summary))
    announce_result(summary)
    return links


def announce_result(summary: dict) -> None:
    """The outcome as an event related to this flow run: `prefect deployment run --watch`
    streams the run's events, so its user reads the outcome there, whatever the server's log
    streaming settings."""
    from prefect.events import emit_event
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    emit_event(
        event="petalflow.train.finished",
        resource={"prefect.resource.id": f"petalflow.train.{flow_run.id}",
                  "prefect.resource.name": state_message(summary)},
        related=[{"prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
                  "prefect.resource.role": "flow-run"}],
        payload={k: summary.get(k) for k in ("status", "model_name", "model_version", "alias",
                                             "alias_reason")},
    )


def prediction_line(summary: dict, output: Optional[str] = None) -> str:
    """What a prediction job did, in one line: the final state's message of a batch-predict run
    (with the output's absolute path) and what ``petalflow predict`` prints (with the output
    as it was typed)."""
    n, errors = summary["images"], summary["errors"]
    used = model_said(summary["model_uri"], summary.get("model_version_uri"))
    return (f"classified {n - errors} of {counted(n, 'image')} ({counted(errors, 'error')}) "
            f"with {used} -> {output or summary['output']}")


def prediction_markdown(summary: dict) -> str:
    """The batch-predict artifact: how many images, errors, output, images per label."""
    inputs = inputs_said(summary["inputs"])
    counts = pd.DataFrame(list(summary["labels"].items()), columns=["label", "count"])
    return (f"# Batch prediction\n\n{counted(summary['images'], 'image')} from {inputs} with "
            f"`{model_said(summary['model_uri'], summary.get('model_version_uri'))}`: "
            f"{summary['images'] - summary['errors']} classified, "
            f"{counted(summary['errors'], 'error')}. Output: `{summary['output']}`.\n\n"
            + _table(counts)
            + "\n\n" + drift_line(summary.get("drift")) + "\n")
