"""The per-dataset table printed before training: every image accounted for.

``print_data_report`` (apply, after the caches) and ``print_discovery_report`` (``sana-ray
validate --data``, discovery only: no torch, no Ray) print the same table: files found, used,
skipped by reason, role, repeats, weight, samples per epoch and the buckets; then the first
skipped paths per reason with what was wrong. ``write_data_report`` writes the whole account
(every skipped path) as ``data_report.json`` + ``data_report.txt`` for the run folder and MLflow
(``log_data_report``). Both printers end by checking that the training data can fill one global
batch, raising ``SamplerError`` with the numbers and the fix when it cannot.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from sana_ray.files import write_json_atomic, write_text_atomic
from sana_ray.launch.console import console

REPORT_JSON = "data_report.json"
REPORT_TEXT = "data_report.txt"
SHOWN_PER_REASON = 5


def _print_table(table: Table) -> None:
    """Piped output (logs, CI) is not squeezed to 80 columns: names and sizes stay whole."""
    if console.is_terminal:
        console.print(table)
    else:
        from rich.console import Console

        Console(highlight=False, width=200).print(table)


def data_table(reports) -> Table:
    table = Table(title="Datasets", title_justify="left")
    columns = ("dataset", "role", "found", "used", "skipped", "repeats", "weight", "samples/epoch", "buckets (WxH px: n)")
    for column in columns:
        table.add_column(column, justify="right" if column in ("found", "used", "repeats", "weight", "samples/epoch") else "left")
    for report in reports:
        skipped = ", ".join(f"{len(paths)} {reason}" for reason, paths in sorted(report.skipped.items()) if paths) or "-"
        buckets = ", ".join(f"{size}: {n}" for size, n in sorted(report.buckets.items(), key=lambda kv: -kv[1])) or "-"
        table.add_row(
            report.dataset, report.role, str(report.found), str(report.used), skipped, str(report.repeats),
            f"{report.probability:g}", str(report.samples_per_epoch) if report.role != "eval" else "-", buckets,
        )
    return table


def _print_skipped(reports) -> None:
    for report in reports:
        for reason, paths in sorted(report.skipped.items()):
            for path in paths[:SHOWN_PER_REASON]:
                detail = report.details.get(path)
                console.print(f"  [dim]{report.dataset}: skipped ({reason}): {path}" + (f" - {detail}" if detail else "") + "[/]",
                              highlight=False, soft_wrap=True)
            if len(paths) > SHOWN_PER_REASON:
                console.print(f"  [dim]{report.dataset}: ... and {len(paths) - SHOWN_PER_REASON} more ({reason}); "
                              f"every path is in {REPORT_TEXT}[/]", highlight=False)


def report_text(reports) -> str:
    """Every dataset's account, with every skipped path and why (the artifact's text form)."""
    lines = []
    for report in reports:
        extra = (f", loss weight {report.loss_weight:g}" if report.loss_weight != 1.0 else "") + (
            ", loss masks" if report.masked else "")
        lines.append(report.summary() + f" [role {report.role}, repeats {report.repeats}, weight {report.probability:g}, "
                     f"samples/epoch {report.samples_per_epoch}{extra}]")
        for size, n in sorted(report.buckets.items(), key=lambda kv: -kv[1]):
            lines.append(f"  bucket {size}: {n}")
        for reason, paths in sorted(report.skipped.items()):
            for path in paths:
                detail = report.details.get(path)
                lines.append(f"  skipped ({reason}): {path}" + (f" - {detail}" if detail else ""))
    return "\n".join(lines) + "\n"


def write_data_report(reports, out_dir: Path, plan: dict | None = None) -> Path:
    """Write data_report.json and data_report.txt into ``out_dir``; returns the JSON's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"datasets": [r.to_json() for r in reports], "plan": plan}
    write_json_atomic(out_dir / REPORT_JSON, data, indent=1)
    write_text_atomic(out_dir / REPORT_TEXT, report_text(reports))
    return out_dir / REPORT_JSON


def log_data_report(tracking_uri: str, run_id: str, out_dir: Path) -> None:
    """Log the files ``write_data_report`` wrote into the MLflow run (under ``data/``)."""
    from sana_ray.launch.tracking import RunLogger

    logger = RunLogger(tracking_uri, run_id)
    for name in (REPORT_JSON, REPORT_TEXT):
        path = Path(out_dir) / name
        if path.is_file():
            logger.log_artifact(path, "data")


def _plan_summary(plan) -> dict:
    return {
        "samples_per_epoch": plan.samples_per_epoch,
        "global_batch_size": plan.global_batch_size,
        "global_batches_per_epoch": plan.global_batches_per_epoch(),
    }


def _finish(reports, make_plan, out_dir: Path | None, buckets_line: str) -> None:
    from sana_ray.data.sampler import SamplerError

    console.print(buckets_line, highlight=False)
    try:
        plan = make_plan()
    except SamplerError:
        if out_dir is not None:
            write_data_report(reports, out_dir, None)
        raise
    if out_dir is not None:
        write_data_report(reports, out_dir, _plan_summary(plan))
    console.print(f"{plan.samples_per_epoch} samples per epoch in global batches of {plan.global_batch_size}")


def print_data_report(reports, cache_set, spec, out_dir: Path | None = None) -> None:
    """The table after the caches are built (buckets are latent shapes), then the batch-plan check.

    With ``out_dir`` (the run folder), also writes data_report.json / .txt there.
    Raises SamplerError with the numbers and the fix when one global batch cannot be formed.
    """
    _print_table(data_table(reports))
    _print_skipped(reports)
    shapes: dict[int, int] = {}
    for bucket in cache_set.buckets.tolist():
        shapes[bucket] = shapes.get(bucket, 0) + 1
    line = "latent buckets: " + ", ".join(f"{'x'.join(map(str, cache_set.bucket_shapes[b]))}: {n}" for b, n in sorted(shapes.items()))
    if getattr(cache_set, "eval_sets", None):
        line += f"; eval sets (not trained on): {', '.join(cache_set.eval_sets)}"
    training = spec.training
    _finish(reports, lambda: cache_set.batch_plan(training.batch_size, spec.hardware.num_workers, training.seed), out_dir, line)


def discovery_plan(found, batch_size: int, world_size: int, seed: int):
    """The BatchPlan of discovered (not yet cached) training samples, bucketed by pixel size
    (the same grouping as latent shapes: the VAE maps each pixel size to one latent shape)."""
    from sana_ray.data.sampler import BatchPlan

    sizes: dict[tuple[int, int], int] = {}
    buckets, repeats, weights, groups = [], [], [], []
    for number, (dataset, samples, report) in enumerate(found):
        if report.role == "eval":
            continue
        for sample in samples:
            buckets.append(sizes.setdefault(sample.geometry.size, len(sizes)))
            repeats.append(dataset.repeats)
            weights.append(float(dataset.probability))
            groups.append(number)
    labels = [f"{w}x{h} px" for w, h in sizes]
    return BatchPlan(buckets, repeats, batch_size=batch_size, world_size=world_size, seed=seed,
                     weights=weights, groups=groups, bucket_labels=labels)


def print_discovery_report(found, spec, out_dir: Path | None = None) -> None:
    """``sana-ray validate --data``: the table from discovery alone (no caches, no torch, no Ray)."""
    reports = [report for _, _, report in found]
    _print_table(data_table(reports))
    _print_skipped(reports)
    training = spec.training
    _finish(reports, lambda: discovery_plan(found, training.batch_size, spec.hardware.num_workers, training.seed), out_dir,
            "(buckets are output sizes in pixels; latents are 32x smaller with Sana's DC-AE)")
