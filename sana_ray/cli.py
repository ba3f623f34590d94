"""The `sana-ray` command line.

Start-up stays fast: this module imports only the standard library and the manifest package;
torch, Ray, diffusers and MLflow are imported inside the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from sana_ray import __version__

LOOPBACK = "127.0.0.1"


def _redacted(error: BaseException) -> str:
    from sana_ray.redaction import redact_text

    return redact_text(str(error))


def _load(path: str, overrides: list[str]):
    """Load and validate a manifest, or print the problems and exit 1 (never a traceback)."""
    from sana_ray.manifest import ManifestError, load_manifest

    try:
        return load_manifest(path, overrides)
    except ManifestError as error:
        print(str(error), file=sys.stderr)
        raise SystemExit(1) from None


def _load_any(path: str, overrides: list[str]):
    """Like _load, for either kind of manifest: a TrainingRun Manifest or a Sweep."""
    from sana_ray.manifest import ManifestError, load_document

    try:
        return load_document(path, overrides)
    except ManifestError as error:
        print(str(error), file=sys.stderr)
        raise SystemExit(1) from None


def _is_sweep(document) -> bool:
    return getattr(document, "kind", None) == "Sweep"


def cmd_validate(args: argparse.Namespace) -> int:
    from sana_ray.manifest import dump_manifest

    manifest = _load_any(args.manifest, args.overrides)
    if getattr(args, "data", False):
        return _validate_data(manifest.template_manifest() if _is_sweep(manifest) else manifest, args.manifest)
    print(dump_manifest(manifest), end="")
    print(f"# {args.manifest}: valid", file=sys.stderr)
    return 0


def _validate_data(manifest, path: str) -> int:
    """`validate --data`: discover every dataset and print the per-dataset table (no caches, torch or Ray)."""
    from sana_ray.data.sampler import SamplerError
    from sana_ray.data.samples import DataError, discover_datasets
    from sana_ray.launch.report import print_discovery_report

    try:
        print_discovery_report(discover_datasets(manifest.spec.datasets), manifest.spec)
    except (DataError, SamplerError) as error:
        print(f"error: {_redacted(error)}", file=sys.stderr)
        return 1
    print(f"# {path}: valid; data checked", file=sys.stderr)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    manifest = _load_any(args.manifest, args.overrides)
    from sana_ray.data.sampler import SamplerError
    from sana_ray.data.samples import DataError
    from sana_ray.plan import PlanError

    try:
        if _is_sweep(manifest):
            from sana_ray.launch.sweep import apply_sweep

            return apply_sweep(manifest, restart=args.restart)
        from sana_ray.launch.apply import apply

        return apply(manifest, restart=args.restart)
    except (DataError, SamplerError) as error:
        print(f"error: {_redacted(error)}", file=sys.stderr)
        return 1
    except PlanError as error:  # hardware.strategy: auto with nothing that fits
        print(f"{args.manifest}: {_redacted(error)}", file=sys.stderr)
        return 1


def cmd_schema(args: argparse.Namespace) -> int:
    from sana_ray.manifest import manifest_json_schema

    text = json.dumps(manifest_json_schema(), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Memory, step time and communication per GPU for a manifest (pure arithmetic: no torch, no Ray)."""
    manifest = _load(args.manifest, args.overrides)
    from sana_ray.plan import PlanError, make_plan, render

    try:
        plan = make_plan(manifest, profile=args.profile, model=args.model, strategy=args.strategy,
                         mfu=args.mfu, max_comm_fraction=args.max_comm)
    except PlanError as error:
        print(f"error: {_redacted(error)}", file=sys.stderr)
        return 1
    render(plan)
    if plan.best() is None:  # scripts (`sana-ray plan m.yaml && sana-ray apply m.yaml`) must see it
        print(f"{args.manifest}: no strategy fits this hardware (see the verdict above)", file=sys.stderr)
        return 1
    return 0


def _tracking_uri(args: argparse.Namespace) -> str:
    if args.store:
        return args.store
    if args.manifest:
        manifest = _load_any(args.manifest, [])
        from sana_ray.launch.tracking import default_tracking_uri

        spec = manifest.spec.template if _is_sweep(manifest) else manifest.spec
        return spec.tracking.mlflow_tracking_uri or default_tracking_uri(spec.output.dir)
    default = Path("runs") / "mlflow.db"
    return f"sqlite:///{default.resolve()}"


def cmd_ui(args: argparse.Namespace) -> int:
    from sana_ray.launch.tracking import local_artifact_root, redact_uri

    uri = _tracking_uri(args)
    if args.host != LOOPBACK:
        print(f"warning: the MLflow UI will listen on {args.host}; MLflow has no authentication here", file=sys.stderr)
    # One worker: a UI for one person; MLflow's default of 4 workers costs 4 imports of MLflow.
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port), "--workers", "1"]
    artifacts = local_artifact_root(uri)
    if artifacts:
        command += ["--default-artifact-root", artifacts]
    print(f"MLflow UI for {redact_uri(uri)}\n  http://{args.host}:{args.port}\n(Ctrl-C to stop)", flush=True)
    # Own process group: stopping the CLI must also stop the server's worker children.
    process = subprocess.Popen(command, start_new_session=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def cmd_runs(args: argparse.Namespace) -> int:
    from sana_ray.launch.runs import show

    return show(_tracking_uri(args), args.name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sana-ray",
        description="Declarative, Ray-based training for NVIDIA Sana text-to-image models.",
        epilog="Overrides are dotted manifest paths applied before validation, e.g. training.steps=50 "
        "or datasets.0.resolution=512 (relative to spec unless they start with metadata/spec).",
    )
    parser.add_argument("--version", action="version", version=f"sana-ray {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("apply", help="train what a manifest describes, or run its sweep (resumes an interrupted one)")
    p.add_argument("manifest")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--restart", action="store_true", help="start a new attempt even if the manifest is unchanged")
    p.set_defaults(func=cmd_apply)

    p = commands.add_parser("validate", help="print the resolved manifest (defaults filled) or its errors")
    p.add_argument("manifest")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--data", action="store_true", help="also find every dataset's images and captions and print what "
                   "would be used, skipped (and why) and bucketed, without building caches")
    p.set_defaults(func=cmd_validate)

    p = commands.add_parser("plan", help="predict memory, step time and communication per GPU (no GPU needed)")
    p.add_argument("manifest")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--profile", help="size against this GPU profile instead of hardware.profile "
                   "(rtx4090, a6000, l40s, a100-40g, a100-80g, h100, cpu)")
    p.add_argument("--model", help="transformer size when model.pretrained does not tell: sana-600m, sana-1600m, "
                   "sana15-1600m, sana15-4800m, tiny, tiny-sana15")
    p.add_argument("--strategy", help="auto (the fastest that fits) or ddp, zero1, zero2, zero2-offload, zero3, "
                   "zero3-offload, zero3-offload-all (default: hardware.strategy)")
    p.add_argument("--mfu", type=float, default=0.25, help="assumed model FLOPs utilisation (default 0.25, measured on an H200)")
    p.add_argument("--max-comm", type=float, default=0.2,
                   help="fraction of the step communication may take; plan says what accumulation gets there (default 0.2)")
    p.set_defaults(func=cmd_plan)

    p = commands.add_parser("schema", help="write the manifest's JSON Schema (for editor completion)")
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    p.set_defaults(func=cmd_schema)

    p = commands.add_parser("ui", help="start the MLflow UI for a manifest's store on 127.0.0.1")
    p.add_argument("manifest", nargs="?", help="manifest whose tracking store to open (default: ./runs/mlflow.db)")
    p.add_argument("--store", help="an MLflow tracking URI instead of a manifest's")
    p.add_argument("--host", default=LOOPBACK, help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = commands.add_parser("runs", help="compare runs in MLflow: the trials of sweep NAME (values, metric, steps, "
                            "status), or every run")
    p.add_argument("name", nargs="?", help="a sweep (or run) name; default: list the runs")
    p.add_argument("-f", "--manifest", help="manifest whose tracking store to read (default: ./runs/mlflow.db)")
    p.add_argument("--store", help="an MLflow tracking URI instead of a manifest's")
    p.set_defaults(func=cmd_runs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting a positional list at the first option, so overrides written after
    # an option (`apply m.yaml --restart training.steps=5`) arrive here: keep them in order.
    overrides = [token for token in extra if "=" in token and not token.startswith("-")]
    if hasattr(args, "overrides") and overrides:
        args.overrides = list(args.overrides) + overrides
        extra = [token for token in extra if token not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
