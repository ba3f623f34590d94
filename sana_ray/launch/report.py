"""The per-dataset table printed before training: every image accounted for."""

from __future__ import annotations

from rich.table import Table

from sana_ray.launch.console import console


def print_data_report(reports, cache_set, spec) -> None:
    """Found / used / skipped per dataset, samples per epoch with repeats, and the latent buckets.

    Also checks, before any worker starts, that the data can fill one global batch.
    """
    table = Table(title="Datasets", title_justify="left")
    for column in ("dataset", "found", "used", "skipped", "repeats", "samples/epoch"):
        table.add_column(column, justify="left" if column in ("dataset", "skipped") else "right")
    by_name = {d.name: d for d in spec.datasets}
    for report in reports:
        skipped = ", ".join(f"{len(paths)} {reason}" for reason, paths in report.skipped.items() if paths) or "-"
        repeats = by_name[report.dataset].repeats
        table.add_row(report.dataset, str(report.found), str(report.used), skipped, str(repeats), str(report.used * (1 + repeats)))
    console.print(table)
    shapes = {}
    for bucket in cache_set.buckets:
        shapes[bucket] = shapes.get(bucket, 0) + 1
    console.print("latent buckets: " + ", ".join(
        f"{'x'.join(map(str, cache_set.bucket_shapes[b]))}: {n}" for b, n in sorted(shapes.items())))
    for report in reports:
        for reason, paths in report.skipped.items():
            for path in paths[:5]:
                console.print(f"  [dim]skipped ({reason}): {path}[/]")
            if len(paths) > 5:
                console.print(f"  [dim]... and {len(paths) - 5} more ({reason})[/]")
    # Raises SamplerError with the numbers and the fix when one global batch cannot be formed.
    training = spec.training
    plan = cache_set.batch_plan(training.batch_size, spec.hardware.num_workers, training.seed)
    console.print(f"{plan.samples_per_epoch} samples per epoch in global batches of {plan.global_batch_size}")
