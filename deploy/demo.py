"""`tierflow demo`: the whole lifecycle of Kafka-ML's user manual, on the embedded stack, in one command.

Registers an edge -> fog -> cloud chain (each sub-model with its own early exit) and one ordinary model, groups
them in a configuration, deploys it for training, sends the training data through Kafka with a Kafka-ML style
sink, shows training progress live per epoch and exit, serves the trained chain tier by tier, streams a held-out
test split through the tiers as a Kafka-ML inference client would (one raw sample per record), and prints what
happened: accuracy per exit and of the cascade, the share of inputs each tier answered, latency and throughput.

The stack is started (detached) when none is running for TIERFLOW_HOME and stopped at the end unless `--keep`;
a stack that was already running is left running (the demo only stops its own inference). With both
TIERFLOW_API_URL and KAFKA_BOOTSTRAP_SERVERS set, the demo runs against that deployment (a cluster) instead. The
API token comes from the stack it uses (or --token / TIERFLOW_API_TOKEN); `--keep` prints the web UI's one-time
address with it, as `tierflow up` does.
Everything goes through the public API and Kafka, as a user's own scripts would: the demo process never imports
TensorFlow.
`--json PATH` writes the summary for scripts and tests.

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
from tierflow.deploy.demo_data import DemoError, DemoOptions
from tierflow.deploy.demo_lifecycle import Demo, say
from tierflow.deploy.demo_summary import format_summary, where_next
from tierflow.deploy.stack_processes import healthy, ui_url
from tierflow.streams.cli_args import non_negative, positive_int
from tierflow.streams.settings import Settings
from tierflow.streams.stack_state import read_stack_state, resolve_api_token, resolve_home


def run(args: argparse.Namespace, settings: Settings) -> int:
    logging.getLogger("tierflow.sinks").setLevel(logging.WARNING)  # the demo says what its sink did
    options = DemoOptions(dataset=args.dataset, epochs=args.epochs, limit=args.limit,
                          train_samples=args.train_samples, test_samples=args.test_samples, rate=args.rate,
                          timeout_s=args.timeout)
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
                    "Kafka, serve the chain tier by tier and stream held-out inputs through it, then print "
                    "accuracy per exit and of the cascade, the share answered per tier, latency and throughput.")
    demo.add_argument("--dataset", default="auto", metavar="NAME",
                      help="fashion-mnist (Debian package dataset-fashion-mnist), digits (scikit-learn), or "
                           "npz:PATH of 28x28 images; default: fashion-mnist when installed, else digits")
    demo.add_argument("--epochs", type=positive_int, default=5, help="training epochs (default 5)")
    demo.add_argument("--limit", type=non_negative, default=0.8,
                      help="a tier answers when its highest probability is >= this (default 0.8)")
    demo.add_argument("--train-samples", type=positive_int, default=20000, metavar="N",
                      help="most samples sent for training (default 20000)")
    demo.add_argument("--test-samples", type=positive_int, default=2000, metavar="N",
                      help="most held-out samples streamed through the tiers (default 2000)")
    demo.add_argument("--rate", type=non_negative, default=500.0, metavar="PER_S",
                      help="inputs per second sent for inference (default 500; 0 = as fast as possible)")
    demo.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                      help="longest wait for any one step (default 600)")
    demo.add_argument("--keep", action="store_true",
                      help="leave the stack (and the inference) running and print where to look")
    demo.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    demo.add_argument("--token", metavar="TOKEN",
                      help="the API token (default: TIERFLOW_API_TOKEN, else the stack's; only for another API)")
    demo.set_defaults(func=run)
