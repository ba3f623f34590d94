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


def _load(path: str, overrides: list[str]):
    """Load and validate a manifest, or print the problems and exit 1 (never a traceback)."""
    from sana_ray.manifest import ManifestError, load_manifest

    try:
        return load_manifest(path, overrides)
    except ManifestError as error:
        print(str(error), file=sys.stderr)
        raise SystemExit(1) from None


def cmd_validate(args: argparse.Namespace) -> int:
    from sana_ray.manifest import dump_manifest

    manifest = _load(args.manifest, args.overrides)
    print(dump_manifest(manifest), end="")
    print(f"# {args.manifest}: valid", file=sys.stderr)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    manifest = _load(args.manifest, args.overrides)
    from sana_ray.data.sampler import SamplerError
    from sana_ray.data.samples import DataError
    from sana_ray.launch.apply import apply

    try:
        return apply(manifest, restart=args.restart)
    except (DataError, SamplerError) as error:
        print(f"error: {error}", file=sys.stderr)
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


def _tracking_uri(args: argparse.Namespace) -> str:
    if args.store:
        return args.store
    if args.manifest:
        manifest = _load(args.manifest, [])
        from sana_ray.launch.tracking import default_tracking_uri

        return manifest.spec.tracking.mlflow_tracking_uri or default_tracking_uri(manifest.spec.output.dir)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sana-ray",
        description="Declarative, Ray-based training for NVIDIA Sana text-to-image models.",
        epilog="Overrides are dotted manifest paths applied before validation, e.g. training.steps=50 "
        "or datasets.0.resolution=512 (relative to spec unless they start with metadata/spec).",
    )
    parser.add_argument("--version", action="version", version=f"sana-ray {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("apply", help="train what a manifest describes (resumes an interrupted run)")
    p.add_argument("manifest")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--restart", action="store_true", help="start a new attempt even if the manifest is unchanged")
    p.set_defaults(func=cmd_apply)

    p = commands.add_parser("validate", help="print the resolved manifest (defaults filled) or its errors")
    p.add_argument("manifest")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_validate)

    p = commands.add_parser("schema", help="write the manifest's JSON Schema (for editor completion)")
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    p.set_defaults(func=cmd_schema)

    p = commands.add_parser("ui", help="start the MLflow UI for a manifest's store on 127.0.0.1")
    p.add_argument("manifest", nargs="?", help="manifest whose tracking store to open (default: ./runs/mlflow.db)")
    p.add_argument("--store", help="an MLflow tracking URI instead of a manifest's")
    p.add_argument("--host", default=LOOPBACK, help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
