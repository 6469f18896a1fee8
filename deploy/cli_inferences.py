"""`tierflow inferences ...`: serve trained chains and watch them (over the HTTP API).

Registered by the front door (deploy/cli.py). Builds on the table and error helpers of cli_resources.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tierflow.deploy.cli_resources import (
    Resource,
    UsageError,
    _command,
    _json_flag,
    _register_common,
    _register_delete,
    cell,
    format_kv,
    format_table,
    format_time,
    render_list,
)

JSON = dict[str, Any]


def inference_row(i: JSON) -> list[str]:
    tiers = i.get("tiers") or []
    return [str(i["id"]), cell(i.get("status")), cell(i.get("result_id")),
            " -> ".join(str(t.get("model_name")) for t in tiers), cell(i.get("input_topic")),
            cell(i.get("output_topic")), format_time(i.get("created_at"))]


def render_inference(i: JSON) -> str:
    text = format_kv([("id", str(i["id"])), ("status", cell(i.get("status"))),
                      ("entry result", cell(i.get("result_id"))),
                      ("input", f"{i.get('input_topic')} ({i.get('input_format')})"),
                      ("output", cell(i.get("output_topic"))), ("created", format_time(i.get("created_at")))])
    rows = [[str(t["index"]), cell(t.get("model_name")), cell(t.get("result_id")), cell(t.get("input_topic")),
             cell(t.get("upper_topic")), _limit(t), cell(t.get("replicas")),
             cell(t.get("bootstrap_servers") or "default")] for t in i.get("tiers") or []]
    return (text + _target(i) + "\n\ntiers:\n"
            + format_table(["TIER", "MODEL", "RESULT", "INPUT", "UPPER", "LIMIT", "REPLICAS", "CLUSTER"], rows))


def _limit(t: JSON) -> str:
    """A tier's limit and what it is compared with: "0.8" (raw max(p)), "0.8512 (calibrated, T 1.32)"."""
    if t.get("top"):
        return "top"
    limit = t.get("limit")
    if not isinstance(limit, int | float):
        return "-"
    if t.get("compare") == "calibrated":
        return f"{limit:g} (calibrated, T {t.get('temperature', 1.0):.2f})"
    return f"{limit:g}"


def _target(i: JSON) -> str:
    """The target and what the chosen limits are predicted to do (nothing for typed limits)."""
    target, predicted = i.get("target"), i.get("predicted")
    if not target or not predicted:
        return ""
    (kind, value), = target.items()
    shares = " / ".join(f"{100 * s:.1f}%" for s in predicted.get("shares") or [])
    text = (f"\ntarget      {kind.replace('_', ' ')} {value:g}\n"
            f"predicted   shares {shares}; accuracy {predicted['accuracy']:.4f} (top exit alone "
            f"{predicted['top_accuracy']:.4f}, drop <= {predicted['accuracy_drop_upper']:.4f} at "
            f"{predicted['confidence']:.0%}); agreement with the top {predicted['agreement']:.4f} "
            f"(on {predicted['n']} validation samples)")
    test = predicted.get("test")
    if test:
        text += (f"\non test    shares {' / '.join(f'{100 * s:.1f}%' for s in test['shares'])}; accuracy "
                 f"{test['accuracy']:.4f} (top exit alone {test['top_accuracy']:.4f}; {test['n']} samples)")
    return text


def render_predictions(d: JSON) -> str:
    items: list[JSON] = d.get("items") or []
    if not items:
        return "no predictions yet" + _unreachable(d)
    rows = [[cell(p.get("tier")), cell(p.get("class")),
             f"{p['confidence']:.3f}" if isinstance(p.get("confidence"), float) else "-",
             _origin(p.get("origin")), f"{p['latency_ms']:.1f}" if isinstance(p.get("latency_ms"), float) else "-"]
            for p in items]
    return format_table(["TIER", "CLASS", "CONFIDENCE", "ORIGIN", "LATENCY MS"], rows) + _unreachable(d)


def _origin(o: Any) -> str:
    if isinstance(o, dict):
        return f"{o.get('topic')}[{o.get('partition')}]@{o.get('offset')}"
    if isinstance(o, list) and len(o) == 3:
        return f"{o[0]}[{o[1]}]@{o[2]}"
    return "-"


def _ms(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, int | float) else "-"


def render_stats(d: JSON) -> str:
    rows = [[str(t["index"]), cell(t.get("model_name")), f"{t.get('limit', 0):g}", str(t.get("answered")),
             f"{100 * t.get('share', 0):.1f}%", _ms((t.get("latency_ms") or {}).get("p50")),
             _ms((t.get("latency_ms") or {}).get("p99")), cell(t.get("lag"))] for t in d.get("tiers") or []]
    lat = d.get("latency_ms") or {}
    tput = d.get("throughput_per_s")
    head = format_kv([("inference", cell(d.get("inference_id"))), ("status", cell(d.get("status"))),
                      ("window", f"{d.get('window')} latest answers"),
                      ("throughput", f"{tput:.1f} answers/s" if isinstance(tput, float) else "-"),
                      ("latency", f"p50 {_ms(lat.get('p50'))} ms, p95 {_ms(lat.get('p95'))} ms, "
                                  f"p99 {_ms(lat.get('p99'))} ms")])
    columns = ["TIER", "MODEL", "LIMIT", "ANSWERED", "SHARE", "P50 MS", "P99 MS", "LAG"]
    return head + "\n\nexits:\n" + format_table(columns, rows) + _agreement(d) + _unreachable(d)


def _share(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, int | float) else "-"


def _ratio(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, int | float) else "-"


def _agreement(d: JSON) -> str:
    """Per tier below the top: observed against predicted share, and the live agreement of its answers with the
    top exit (shadow samples) against the predicted one and its lower bound, flagged when it drifts below."""
    tiers: list[JSON] = d.get("tiers") or []
    if not any(t.get("predicted") or (t.get("live") or {}).get("n") for t in tiers):
        return ""
    rows = []
    for t in tiers:
        live, predicted = t.get("live") or {}, t.get("predicted") or {}
        rows.append([str(t["index"]), _share(t.get("observed_share")), _share(predicted.get("share")),
                     _ratio(live.get("agreement")), cell(live.get("n")) if live else "top",
                     _ratio(predicted.get("agreement")), _ratio(predicted.get("agreement_lower")),
                     "DRIFT" if live.get("drift") else "-"])
    columns = ["TIER", "SHARE", "PREDICTED SHARE", "LIVE AGREEMENT", "SHADOWS", "PREDICTED AGREEMENT",
               "LOWER BOUND", "DRIFT"]
    return ("\n\nearly answers against the top exit (live: the latest shadow samples; predicted: the validation "
            "split):\n" + format_table(columns, rows))


def _unreachable(d: JSON) -> str:
    bad = d.get("unreachable") or []
    return "".join(f"\nwarning: could not read {b}" for b in bad)


INFERENCES = Resource("inference", "/inferences",
                      ("ID", "STATUS", "ENTRY", "TIERS", "INPUT", "OUTPUT", "CREATED"), inference_row, render_inference)


def inference_body(args: argparse.Namespace) -> JSON:
    body: JSON = {}
    if args.file:
        with open(args.file, encoding="utf-8") as fh:
            try:
                body = json.load(fh)
            except json.JSONDecodeError as exc:
                raise UsageError(f"--file {args.file} is not JSON: {exc}") from None
    for key, value in (("result_id", args.result), ("input_topic", args.input_topic),
                       ("output_topic", args.output_topic), ("limit", args.limit), ("replicas", args.replicas)):
        if value is not None:
            body[key] = value
    targets = [(kind, value) for kind, value in (("max_accuracy_drop", args.max_accuracy_drop),
                                                  ("min_accuracy", args.min_accuracy),
                                                  ("max_top_share", args.max_top_share)) if value is not None]
    if len(targets) > 1:
        raise UsageError("give one of --max-accuracy-drop, --min-accuracy, --max-top-share")
    if targets:
        body["target"] = dict(targets)
    if args.shadow_fraction is not None:
        body["shadow_fraction"] = args.shadow_fraction
    for name, flag in (("limits", args.limits), ("tiers", args.tiers), ("input_config", args.input_config),
                       ("costs_s", args.costs_s)):
        if flag:
            try:
                body[name] = json.loads(flag)
            except json.JSONDecodeError as exc:
                raise UsageError(f"--{name.replace('_', '-')} is not JSON: {exc}") from None
    for required in ("result_id", "input_topic", "output_topic"):
        if required not in body:
            raise UsageError(f"--{required.replace('_id', '').replace('_', '-')} is required (or give it in --file)")
    return body


def register(subparsers: Any) -> None:
    json_flag = _json_flag()
    inf = subparsers.add_parser("inferences", help="serve trained chains tier by tier and watch their answers")
    isub = inf.add_subparsers(dest="action", required=True, metavar="ACTION")
    _register_common(isub, INFERENCES, json_flag)
    create = isub.add_parser("create", parents=[json_flag], help="serve a finished result and the chain above it")
    create.add_argument("--result", type=int, metavar="ID", help="the entry result (any result of a chain)")
    create.add_argument("--input-topic", metavar="T")
    create.add_argument("--output-topic", metavar="T")
    create.add_argument("--limit", type=float, help="answer when max(probabilities) >= limit (default 0.8)")
    create.add_argument("--limits", metavar="JSON", help='per-tier limits {"<result id>": limit}')
    create.add_argument("--max-accuracy-drop", type=float, metavar="D",
                        help="choose the limits from the chain's exit frontier: the cheapest whose accuracy is at "
                             "most D below the top exit's (90%% bound), instead of --limit")
    create.add_argument("--min-accuracy", type=float, metavar="A", help="... whose cascade accuracy is at least A")
    create.add_argument("--max-top-share", type=float, metavar="S",
                        help="... the most accurate sending at most a share S of the inputs to the top tier")
    create.add_argument("--costs-s", metavar="JSON", help='with a target: {"<result id>": seconds per sample} '
                                                        "overriding the compute measured at training")
    create.add_argument("--shadow-fraction", type=float, metavar="F",
                        help="share of its answers a lower tier also sends up to check them live (default 0.02)")
    create.add_argument("--replicas", type=int)
    create.add_argument("--tiers", metavar="JSON", help="per-tier overrides [{result_id, bootstrap_servers, ...}]")
    create.add_argument("--input-config", metavar="JSON")
    create.add_argument("--file", metavar="PATH", help="the whole request body as JSON")
    create.set_defaults(func=_command(lambda args, api: api.post("/inferences", inference_body(args))[1],
                                      lambda d: f"created inference {d.get('id')}\n{render_inference(d)}"))
    stop = isub.add_parser("stop", parents=[json_flag], help="stop an inference's tiers")
    stop.add_argument("id", type=int, metavar="ID")
    stop.set_defaults(func=_command(lambda args, api: api.post(f"/inferences/{args.id}/stop", {})[1],
                                    render_inference))
    _register_delete(isub, INFERENCES, json_flag, "")
    preds = isub.add_parser("predictions", parents=[json_flag], help="the latest answers (tier, class, confidence)")
    preds.add_argument("id", type=int, metavar="ID")
    preds.add_argument("--limit", type=int, default=20)
    preds.set_defaults(func=_command(
        lambda args, api: api.get(f"/inferences/{args.id}/predictions?limit={args.limit}")[1], render_predictions))
    token = isub.add_parser(
        "token", parents=[json_flag], help="mint the API token of one tier, for a tier started by hand on a device",
        description="Print a token that reads only this inference and the model of tier K (admin only); on the "
                    "device: TIERFLOW_API_TOKEN=<token> tierflow tier run --inference N --tier K --api URL")
    token.add_argument("id", type=int, metavar="N")
    token.add_argument("--tier", type=int, required=True, metavar="K", help="the tier index (0 = the entry tier)")
    token.set_defaults(func=_command(lambda args, api: api.post(f"/inferences/{args.id}/token",
                                                                {"tier": args.tier})[1],
                                     lambda d: str(d.get("token"))))
    stats = isub.add_parser("stats", parents=[json_flag], help="exit distribution per tier, throughput, latency")
    stats.add_argument("id", type=int, metavar="ID")
    stats.add_argument("--window", type=int, default=10_000, help="how many latest answers to summarise")
    stats.set_defaults(func=_command(
        lambda args, api: api.get(f"/inferences/{args.id}/stats?limit={args.window}")[1], render_stats))


__all__ = ["register", "render_list"]
