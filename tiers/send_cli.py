"""`tierflow send`: send a dataset to a deployment through Kafka with the RawSink and announce it.

Registered into the front door by deploy/cli.py (`send_cli.register(subparsers)`); the handler follows
the front door's contract `func(args, settings) -> exit code`. The broker is KAFKA_BOOTSTRAP_SERVERS,
else the running embedded stack's (`<TIERFLOW_HOME>/stack.json`); the control topic is the settings'.
Progress goes to stderr as a plain-text bar; the summary (records, ranges, rate) to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from tierflow.streams.cli_args import positive_int
from tierflow.streams.settings import Settings
from tierflow.streams.stack_state import resolve_bootstrap

_CHUNK = 2_000  # samples per send_many call between progress updates


class ProgressBar:
    """`[#####.....]  12,345/70,000  17%  35,210 rec/s` redrawn in place with `\\r`, at most 10 times a second."""

    def __init__(self, total: int, *, stream: TextIO | None = None, width: int = 30, label: str = "") -> None:
        self.total = max(total, 0)
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.label = label
        self.started = time.monotonic()
        self._drawn = 0.0
        self._last = 0

    def line(self, done: int) -> str:
        frac = 1.0 if self.total == 0 else min(done / self.total, 1.0)
        filled = int(frac * self.width)
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return (f"{self.label}[{'#' * filled}{'.' * (self.width - filled)}] {done:,}/{self.total:,} "
                f"{frac * 100:3.0f}%  {done / elapsed:,.0f} rec/s")

    def update(self, done: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._drawn >= 0.1:
            self._drawn = now
            text = self.line(done)
            self.stream.write("\r" + text.ljust(self._last))  # blank what a longer previous line left
            self._last = len(text)
            self.stream.flush()

    def finish(self, done: int) -> None:
        self.update(done, force=True)
        self.stream.write("\n")
        self.stream.flush()


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return value


def _send(args: argparse.Namespace, settings: Settings) -> int:
    from tierflow.tiers import datasets
    from tierflow.tiers.sinks import RawSink, SinkError

    if args.validation_rate + args.test_rate >= 1:
        print("tierflow send: --validation-rate + --test-rate must be < 1", file=sys.stderr)
        return 2
    try:
        data = datasets.load(args.dataset).head(args.limit)
    except datasets.DatasetError as exc:
        print(f"tierflow send: {exc}", file=sys.stderr)
        return 1
    topic = args.topic or f"tierflow.data.{datasets.slug(args.dataset)}"
    try:
        servers = resolve_bootstrap(settings)
        sink = RawSink(servers, topic, args.deployment, validation_rate=args.validation_rate,
                       test_rate=args.test_rate, description=args.description or data.description,
                       control_topic=settings.kafka.control_topic, partitions=args.partitions)
    except (RuntimeError, ValueError) as exc:
        print(f"tierflow send: {exc}", file=sys.stderr)
        return 1
    total = len(data)
    bar = ProgressBar(total, label=f"{data.name} -> {topic} ")
    started = time.monotonic()
    announcement: dict[str, Any]
    try:
        for start in range(0, total, _CHUNK):
            sink.send_many(data.x[start:start + _CHUNK], data.y[start:start + _CHUNK])
            bar.update(min(start + _CHUNK, total))
        bar.finish(total)
        announcement = sink.close()  # waits for every acknowledgement, then announces
    except (SinkError, ValueError) as exc:
        sink.abort()
        print(f"\ntierflow send: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        sink.abort()
        print("\ntierflow send: interrupted; nothing was announced", file=sys.stderr)
        return 130
    elapsed = max(time.monotonic() - started, 1e-9)
    print(f"sent {announcement['total_msg']:,} records of {data.name} to {topic} in {elapsed:.1f} s "
          f"({announcement['total_msg'] / elapsed:,.0f} records/s)")
    print(f"ranges: {announcement['topic']}")
    print(f"input_config: {announcement['input_config']}")
    print(f"announced for deployment {args.deployment} on {settings.kafka.control_topic} "
          f"(validation {args.validation_rate}, test {args.test_rate})")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `send` to the front door."""
    send = subparsers.add_parser(
        "send", help="send a dataset to a deployment through Kafka and announce it (RawSink)",
        description="Send a dataset as RAW records (key = label, value = sample bytes) and announce the "
                    "datasource on the control topic, so the deployment's training starts.")
    send.add_argument("--deployment", type=positive_int, required=True, metavar="N",
                      help="the deployment that trains on this data")
    send.add_argument("--dataset", required=True, metavar="NAME",
                      help="fashion-mnist (Debian package dataset-fashion-mnist), digits (scikit-learn, 28x28 "
                           "float32 in [0, 1]), digits-8x8, or npz:PATH (arrays x/y or x_train/y_train)")
    send.add_argument("--topic", metavar="T", help="data topic (default tierflow.data.<dataset>)")
    send.add_argument("--validation-rate", type=_rate, default=0.1, metavar="R",
                      help="share of the records for validation (default 0.1)")
    send.add_argument("--test-rate", type=_rate, default=0.1, metavar="R",
                      help="share of the records for the final test (default 0.1)")
    send.add_argument("--partitions", type=positive_int, metavar="P",
                      help="create the topic with P partitions when it does not exist (default 1); an "
                           "existing topic must have P partitions")
    send.add_argument("--limit", type=positive_int, metavar="N", help="send only the first N samples")
    send.add_argument("--description", default="", help="datasource description (default: the dataset's)")
    send.set_defaults(func=_send)
