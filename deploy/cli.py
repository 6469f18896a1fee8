"""The `tierflow` front door: one console entry point that dispatches to every part.

Each area registers its own sub-commands (`register(subparsers)`), and each sub-command's handler is
`func(args, settings) -> exit code`. Settings are read from the environment here, once.
Heavy modules (TensorFlow, the worker, the API) are imported only by the sub-command that needs them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tierflow.streams.settings import Settings, SettingsError


def _run_worker(args: argparse.Namespace, settings: Settings) -> int:
    from tierflow.deploy.bootstrap import make_launcher, sandbox_validation
    from tierflow.streams.worker import run_worker

    return run_worker(settings, sandbox_validation, launcher_factory=make_launcher)


def _run_api(args: argparse.Namespace, settings: Settings) -> int:
    from tierflow.api.app import run_api

    return run_api(settings)


def _rebuild_projections(args: argparse.Namespace, settings: Settings) -> int:
    from tierflow.projections.rebuild import run_rebuild

    return run_rebuild(settings)


def build_parser() -> argparse.ArgumentParser:
    from tierflow.deploy import cli_resources, stack

    parser = argparse.ArgumentParser(
        prog="tierflow",
        description="Train and serve edge -> fog -> cloud neural networks over Kafka.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stack.register(sub)

    worker = sub.add_parser("worker", help="run the control-plane worker (decider, validator, projector)")
    worker.set_defaults(func=_run_worker)
    api = sub.add_parser("api", help="run the HTTP API")
    api.set_defaults(func=_run_api)

    projections = sub.add_parser("projections", help="manage the Postgres read projections")
    psub = projections.add_subparsers(dest="action", required=True, metavar="ACTION")
    rebuild = psub.add_parser("rebuild", help="replay tierflow.events from offset 0 into fresh tables and swap")
    rebuild.set_defaults(func=_rebuild_projections)

    cli_resources.register(sub)

    from tierflow.deploy import cli_inferences, demo

    cli_inferences.register(sub)
    demo.register(sub)

    from tierflow.tiers import sandbox_server, send_cli, tier_cli, train_job

    train_job.register(sub)
    send_cli.register(sub)
    tier_cli.register(sub)
    sandbox_server.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"tierflow: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, settings.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.log_level != "DEBUG":  # the Kafka clients narrate every connection at INFO
        for noisy in ("kafka", "aiokafka"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    code: int = args.func(args, settings)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
