"""`tierflow demo`: the whole lifecycle of Kafka-ML's user manual, on the embedded stack, in one command.

Registers an edge -> fog -> cloud chain (each sub-model with its own early exit) and one ordinary model, groups
them in a configuration, deploys it for training, sends the training data through Kafka with a Kafka-ML style
sink, shows training progress live per epoch and exit, serves the trained chain tier by tier with limits chosen
from a target (`--max-accuracy-drop 0.01` by default; `--min-accuracy`, `--max-top-share`, or a typed `--limit`
as in Kafka-ML), streams a held-out test split through the tiers as a Kafka-ML inference client would (one raw
sample per record), and prints what happened: accuracy per exit and of the cascade, the chosen limits, the
predicted and observed share of inputs each tier answered and accuracy of the cascade, latency and throughput.
A target the validation split is too small to certify (the digits give ~140 validation samples) is relaxed to
the strictest one it certifies, and the summary says so.

The stack is started (detached) when none is running for TIERFLOW_HOME and stopped at the end unless `--keep`;
a stack that was already running is left running (the demo only stops its own inference). With both
TIERFLOW_API_URL and KAFKA_BOOTSTRAP_SERVERS set, the demo runs against that deployment (a cluster) instead. The
API token comes from the stack it uses (or --token / TIERFLOW_API_TOKEN); `--keep` prints the web UI's one-time
address with it, as `tierflow up` does.
Everything goes through the public API and Kafka, as a user's own scripts would: the demo process never imports
TensorFlow.
`--json PATH` writes the summary for scripts and tests. `--seed N` makes a run reproducible: the held-out split and
the deployment's training seed (streams/catalogue.py), so the same N gives the same accuracies and shares.

Registered into the front door by deploy/cli.py (`register(subparsers)`). This module is the command (find or
start the stack, run, print, clean up); the steps are deploy/demo_lifecycle.py, the models, options and data
deploy/demo_data.py, the numbers deploy/demo_summary.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tierflow.deploy import stack
from tierflow.deploy.client import ApiClient, ApiClientError
from tierflow.deploy.demo_data import DEFAULT_TARGET, DemoError, DemoOptions
from tierflow.deploy.demo_lifecycle import Demo, say
from tierflow.deploy.demo_summary import format_summary, where_next
from tierflow.deploy.stack_processes import healthy, ui_url
from tierflow.streams.catalogue import SEED_LIMIT
from tierflow.streams.cli_args import non_negative, positive_int, whole_number
from tierflow.streams.exits import TARGET_KINDS, TargetInvalid, parse_target
from tierflow.streams.settings import Settings
from tierflow.streams.stack_state import read_stack_state, resolve_api_token, resolve_home


def seed_value(text: str) -> int:
    """`--seed`: a whole number a deployment takes as its seed (checked here, before a stack is started)."""
    value = whole_number(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, {SEED_LIMIT})")
    return value


def target_of(args: argparse.Namespace) -> tuple[str, float]:
    """The target the flags ask for (at most one of them: argparse keeps them exclusive), else the default."""
    for kind in TARGET_KINDS:
        value = getattr(args, kind, None)
        if value is not None:
            parse_target({kind: value})  # in range, or TargetInvalid saying which range
            return kind, float(value)
    return DEFAULT_TARGET


def run(args: argparse.Namespace, settings: Settings) -> int:
    logging.getLogger("tierflow.sinks").setLevel(logging.WARNING)  # the demo says what its sink did
    try:
        target = target_of(args)
    except TargetInvalid as exc:
        print(f"tierflow demo: {exc.message}", file=sys.stderr)
        return 2
    options = DemoOptions(dataset=args.dataset, epochs=args.epochs, limit=args.limit, target=target,
                          train_samples=args.train_samples, test_samples=args.test_samples, rate=args.rate,
                          timeout_s=args.timeout, seed=args.seed)
    out = sys.stdout
    started_stack = False
    if settings.api.url and settings.kafka.bootstrap_servers:
        # A deployed tierflow (a cluster): use it as it is, start and stop nothing.
        api_url = settings.api.url.rstrip("/")
        say(out, f"using the tierflow at {api_url} (Kafka {settings.kafka.bootstrap_servers})")
        resolved = settings
        token = resolve_api_token(settings, args.token or "")
    else:
        home = resolve_home(settings)
        state = read_stack_state(home)
        if state is None or not state.alive() or not healthy(state.api_url):
            say(out, f"no running stack for {home}: starting one")
            code = stack.up_detached(settings, timeout_s=options.timeout_s)
            if code != 0:
                return code
            started_stack = True
            state = read_stack_state(home)
            if state is None:
                print("tierflow demo: the stack started but wrote no state file", file=sys.stderr)
                return 1
        else:
            say(out, f"using the running stack for {home} (API {state.api_url})")
        api_url = state.api_url
        # The stack's own token, unless the user gave one: the newcomer types nothing.
        token = args.token or settings.api.token or state.token
        resolved = settings.with_endpoints(
            bootstrap_servers=settings.kafka.bootstrap_servers or state.bootstrap_servers,
            database_url=settings.database.url or state.database_url, api_url=state.api_url)
    api = ApiClient(api_url, token)
    demo = Demo(api, resolved, options, out=out)
    code = 0
    try:
        summary = demo.run()
        say(out, "\n" + format_summary(summary))
        say(out, f"done in {summary['seconds']:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        if args.keep:
            say(out, "\n" + where_next(api_url, summary, ui=ui_url(api_url, token)))
        else:
            say(out, "run `tierflow demo --keep` to look around afterwards: the web UI, the topics, the CLI")
    except (DemoError, ApiClientError) as exc:
        print(f"\ntierflow demo: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\ntierflow demo: interrupted", file=sys.stderr)
        code = 130
    finally:
        if not args.keep:
            # Stopped before the stack goes down too: the events survive `down`, and a running inference
            # would have its tiers relaunched by the next `up`.
            if demo.inference_id is not None:
                try:
                    api.post(f"/inferences/{demo.inference_id}/stop")
                    say(out, f"stopped inference {demo.inference_id}: its tiers are removed")
                except ApiClientError as exc:
                    print(f"tierflow demo: could not stop inference {demo.inference_id}: {exc}", file=sys.stderr)
            if started_stack:
                say(out, "stopping the stack the demo started (pass --keep to leave it running)")
                stack.down(settings)
        elif started_stack:
            say(out, "the stack keeps running: `tierflow status`, `tierflow down`")
    return code


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the whole lifecycle on the embedded stack: register, train, serve, infer",
        description="Register an edge -> fog -> cloud chain and a single model, train them on data sent through "
                    "Kafka, serve the chain tier by tier with limits chosen from an accuracy target and stream "
                    "held-out inputs through it, then print accuracy per exit and of the cascade, the chosen "
                    "limits, the predicted and observed share answered per tier, latency and throughput.")
    demo.add_argument("--dataset", default="auto", metavar="NAME",
                      help="fashion-mnist (Debian package dataset-fashion-mnist), digits (scikit-learn), or "
                           "npz:PATH of 28x28 images; default: fashion-mnist when installed, else digits")
    demo.add_argument("--epochs", type=positive_int, default=5, help="training epochs (default 5)")
    serving = demo.add_mutually_exclusive_group()
    serving.add_argument("--max-accuracy-drop", type=float, metavar="D", dest="max_accuracy_drop",
                         help="serve the chain from this target: the cheapest limits whose cascade accuracy is at "
                              f"most D below the top exit's (the default, with D = {DEFAULT_TARGET[1]})")
    serving.add_argument("--min-accuracy", type=float, metavar="A", dest="min_accuracy",
                         help="... or the cheapest limits whose cascade accuracy is at least A")
    serving.add_argument("--max-top-share", type=float, metavar="S", dest="max_top_share",
                         help="... or the most accurate limits that send at most a share S of inputs to the top")
    serving.add_argument("--limit", type=non_negative, default=None,
                         help="or a typed limit on every tier instead of a target: a tier answers when its highest "
                              "probability is >= this, as in Kafka-ML")
    demo.add_argument("--train-samples", type=positive_int, default=20000, metavar="N",
                      help="most samples sent for training (default 20000)")
    demo.add_argument("--test-samples", type=positive_int, default=2000, metavar="N",
                      help="most held-out samples streamed through the tiers (default 2000)")
    demo.add_argument("--rate", type=non_negative, default=500.0, metavar="PER_S",
                      help="inputs per second sent for inference (default 500; 0 = as fast as possible)")
    demo.add_argument("--seed", type=seed_value, default=None, metavar="N",
                      help="make the run reproducible: the held-out split and the training seed, so the same N gives "
                           "the same accuracies and shares (default: a drawn training seed)")
    demo.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                      help="longest wait for any one step (default 600)")
    demo.add_argument("--keep", action="store_true",
                      help="leave the stack (and the inference) running and print where to look")
    demo.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    demo.add_argument("--token", metavar="TOKEN",
                      help="the API token (default: TIERFLOW_API_TOKEN, else the stack's; only for another API)")
    demo.set_defaults(func=run)
