"""`tierflow models|configurations|deployments|results|datasources ...`: the catalogue from the command line.

Registered by the CLI front door (deploy/cli.py) through `register(subparsers)`. Each sub-command turns its
arguments into an API request body (pure functions), sends it with `ApiClient` (deploy/client.py) and
prints the answer as a human table or key/value view (pure functions), or as the raw API JSON with
`--json`. Exit codes: 0 success, 1 the API refused or could not be reached, 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierflow.deploy.client import JSON, ApiClient, ApiClientError, client_for, with_query
from tierflow.streams.errors import PermanentError
from tierflow.streams.settings import Settings

EXIT_API_ERROR = 1
EXIT_USAGE = 2

Reader = Callable[[str], str]
Handler = Callable[[argparse.Namespace, Settings], int]
Action = Callable[[argparse.Namespace, ApiClient], JSON]


class UsageError(PermanentError):
    """The arguments cannot make a request (missing field, unreadable file, bad JSON); exit code 2."""


# --- formatting (pure) --------------------------------------------------------------------------------

def format_shape(shape: Sequence[int | None] | None) -> str:
    """A Keras shape without its batch axis, as Python writes a tuple: [None, 28, 28, 1] -> "(28, 28, 1)"."""
    if shape is None:
        return "-"
    dims = list(shape)
    if dims and dims[0] is None:
        dims = dims[1:]
    inner = ", ".join("None" if d is None else str(d) for d in dims)
    return f"({inner},)" if len(dims) == 1 else f"({inner})"


def format_shapes(shapes: Sequence[Sequence[int | None]] | None) -> str:
    return ", ".join(format_shape(s) for s in shapes) if shapes else "-"


def format_time(stamp: str | None) -> str:
    """"2024-05-01T12:00:00.123456Z" -> "2024-05-01 12:00:00" (the API answers UTC)."""
    if not stamp:
        return "-"
    return stamp.replace("T", " ", 1).split(".", 1)[0].removesuffix("Z")


def cell(value: Any) -> str:
    """One table or key/value cell: "-" for nothing, yes/no for booleans, compact JSON for containers."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(", ", ": ")) if value else "-"
    return str(value)


def format_count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def format_ids(ids: Sequence[int] | None) -> str:
    return ",".join(str(i) for i in ids) if ids else "-"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns left-aligned to their widest cell, two spaces apart, no trailing blanks."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(line)).rstrip() for line in lines)


def format_kv(pairs: Sequence[tuple[str, str]]) -> str:
    """A key/value view; a multi-line value continues under its first line."""
    width = max((len(k) for k, _ in pairs), default=0)
    out: list[str] = []
    for key, value in pairs:
        first, *rest = value.splitlines() or [""]
        out.append(f"{key.ljust(width)}  {first}".rstrip())
        out.extend(f"{' ' * width}  {line}".rstrip() for line in rest)
    return "\n".join(out)


def format_error(exc: ApiClientError | UsageError) -> str:
    if isinstance(exc, ApiClientError):
        field = f" (field: {exc.field})" if exc.field else ""
        return f"tierflow: {exc.message}{field}"
    return f"tierflow: {exc}"


def model_row(m: JSON) -> list[str]:
    return [str(m["id"]), str(m["name"]), cell(m.get("distributed")), cell(m.get("upper_id")),
            cell(m.get("lower_id")), cell(m.get("version")), format_count(m.get("params")),
            format_shape(m.get("input_shape"))]


def configuration_row(c: JSON) -> list[str]:
    return [str(c["id"]), str(c["name"]), format_ids(c.get("model_ids")), cell(c.get("version")),
            format_time(c.get("updated_at"))]


def deployment_row(d: JSON) -> list[str]:
    fit = d.get("fit_options") or {}
    return [str(d["id"]), cell(d.get("configuration_id")), cell(d.get("batch")), cell(fit.get("epochs")),
            cell(d.get("optimizer")), cell(d.get("loss")), str(len(d.get("result_ids") or [])),
            format_time(d.get("created_at"))]


def result_row(r: JSON) -> list[str]:
    return [str(r["id"]), cell(r.get("deployment_id")), cell(r.get("model_id")), cell(r.get("model_name")),
            cell(r.get("model_version")), cell(r.get("status")), format_time(r.get("updated_at"))]


def render_model(m: JSON, *, with_code: bool = True) -> str:
    pairs = [("id", str(m["id"])), ("name", str(m["name"])), ("description", cell(m.get("description"))),
             ("distributed", cell(m.get("distributed"))), ("upper", cell(m.get("upper_id"))),
             ("lower", cell(m.get("lower_id"))), ("version", cell(m.get("version"))),
             ("params", format_count(m.get("params"))), ("input", format_shape(m.get("input_shape"))),
             ("outputs", format_shapes(m.get("output_shapes"))), ("created", format_time(m.get("created_at"))),
             ("updated", format_time(m.get("updated_at")))]
    text = format_kv(pairs)
    if with_code:
        if m.get("imports"):
            text += f"\n\nimports:\n{str(m['imports']).rstrip()}"
        text += f"\n\ncode:\n{str(m.get('code') or '').rstrip()}"
    return text


def render_configuration(c: JSON) -> str:
    return format_kv([("id", str(c["id"])), ("name", str(c["name"])), ("description", cell(c.get("description"))),
                      ("models", format_ids(c.get("model_ids"))), ("version", cell(c.get("version"))),
                      ("created", format_time(c.get("created_at"))), ("updated", format_time(c.get("updated_at")))])


def render_deployment(d: JSON) -> str:
    versions = d.get("model_versions") or {}
    pinned = ", ".join(f"{mid} (v{v})" for mid, v in versions.items()) or "-"
    return format_kv([("id", str(d["id"])), ("configuration", cell(d.get("configuration_id"))),
                      ("batch", cell(d.get("batch"))), ("optimizer", cell(d.get("optimizer"))),
                      ("learning rate", cell(d.get("learning_rate"))), ("loss", cell(d.get("loss"))),
                      ("metrics", ", ".join(d.get("metrics") or []) or "-"),
                      ("fit options", cell(d.get("fit_options"))), ("eval options", cell(d.get("eval_options"))),
                      ("loss weights", cell(d.get("loss_weights"))), ("seed", cell(d.get("seed"))),
                      ("models", pinned),
                      ("results", format_ids(d.get("result_ids"))), ("created", format_time(d.get("created_at")))])


def render_result(r: JSON) -> str:
    queued = r.get("queued") or {}
    pairs = [("id", str(r["id"])), ("deployment", cell(r.get("deployment_id"))),
             ("model", cell(r.get("model_id"))), ("model name", cell(r.get("model_name"))),
             ("model version", cell(r.get("model_version"))), ("status", cell(r.get("status"))),
             ("chain", format_ids(r.get("chain"))), ("workload", cell(r.get("workload"))),
             ("queued", cell(queued.get("note")) if queued else "-"), ("error", cell(r.get("error"))),
             ("created", format_time(r.get("created_at"))), ("updated", format_time(r.get("updated_at")))]
    text = format_kv(pairs)
    history: list[JSON] = r.get("history") or []
    if history:
        keys = [k for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in history[-1]]
        rows = [[str(h.get("epoch")), *(_metric(h.get(k)) for k in keys)] for h in history]
        text += "\n\nepochs:\n" + format_table(["EPOCH", *(k.upper() for k in keys)], rows)
    metrics: JSON = r.get("metrics") or {}
    if metrics:
        splits = [sp for sp in ("train", "validation", "test") if isinstance(metrics.get(sp), dict)]
        names = sorted({k for sp in splits for k in metrics[sp]})
        rows = [[sp, *(_metric(metrics[sp].get(n)) for n in names)] for sp in splits]
        text += "\n\nfinal metrics:\n" + format_table(["SPLIT", *(n.upper() for n in names)], rows)
    for kind, ref in (r.get("artefacts") or {}).items():
        text += f"\nartefact {kind}: sha256 {ref.get('sha256')} ({format_count(ref.get('size'))} bytes)"
    return text


def _records(ranges: Sequence[JSON] | None) -> int:
    return sum(int(r["end"]) - int(r["start"]) for r in ranges or [])


def _notes(d: JSON) -> str:
    counts = [(len(d.get("range_reasons") or []), "reason"), (len(d.get("warnings") or []), "warning")]
    return ", ".join(f"{n} {word}{'s' if n > 1 else ''}" for n, word in counts if n) or "-"


def datasource_row(d: JSON) -> list[str]:
    used, announced = d.get("ranges") or [], d.get("announced_ranges") or d.get("ranges") or []
    topics = ",".join(dict.fromkeys(str(r.get("topic")) for r in used))
    return [str(d["id"]), cell(d.get("deployment_id")), cell(d.get("input_format")), topics or "-",
            format_count(_records(used)), format_count(_records(announced)), _notes(d),
            format_time(d.get("created_at"))]


def render_datasource(d: JSON) -> str:
    used, announced = d.get("ranges") or [], d.get("announced_ranges") or d.get("ranges") or []
    n_used, n_announced = _records(used), _records(announced)
    records = format_count(n_used) + ("" if n_used == n_announced else f" ({format_count(n_announced)} announced)")
    origin = d.get("origin") or {}
    source = (f"sent from datasource {origin['datasource_id']}" if "datasource_id" in origin else
              f"{origin.get('topic')}[{origin.get('partition')}] offset {origin.get('offset')}" if origin else "-")
    text = format_kv([
        ("id", str(d["id"])), ("deployment", cell(d.get("deployment_id"))), ("format", cell(d.get("input_format"))),
        ("input config", cell(d.get("input_config"))), ("description", cell(d.get("description"))),
        ("split", f"validation {d.get('validation_rate') or 0:.0%}, test {d.get('test_rate') or 0:.0%}"),
        ("records", records), ("total_msg", format_count(d.get("total_msg"))), ("origin", source),
        ("created", format_time(d.get("created_at")))])
    rows = []
    for u, a in zip(used, announced, strict=False):
        diff = (u["end"] - u["start"]) - (a["end"] - a["start"])
        rows.append([str(u.get("topic")), str(u.get("partition")), f"[{a['start']}, {a['end']})",
                     f"[{u['start']}, {u['end']})",
                     format_count(u["end"] - u["start"]) + ("" if u == a else f" ({diff:+,})")])
    text += "\n\nranges (used: what training reads):\n" + format_table(
        ["TOPIC", "PARTITION", "ANNOUNCED", "USED", "RECORDS"], rows)
    reasons, warnings = d.get("range_reasons") or [], d.get("warnings") or []
    if reasons:
        text += "\n\nwhy the used ranges differ from the announced ones:\n" + "\n".join(f"- {r}" for r in reasons)
    else:
        text += "\n\nused as announced"
    if warnings:
        text += "\n\nwarnings:\n" + "\n".join(f"- {w}" for w in warnings)
    return text


def _metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else cell(value)


def format_seconds(value: Any) -> str:
    """A compute time per sample: "45 us", "3.4 ms", "1.20 s"."""
    if not isinstance(value, int | float):
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _spread(n: int, k: int) -> list[int]:
    """At most k indices spread evenly over range(n), both ends included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def render_exits(d: JSON, points: int = 10) -> str:
    """`tierflow results exits R`: per exit T, accuracy and ECE before -> after; then each entry's frontier,
    `points` of its points spread along it (cheapest first)."""
    exits: list[JSON] = d.get("exits") or []
    names = [str(e.get("model_name") or e.get("result_id")) for e in exits]
    cals = [e.get("calibration") for e in exits]
    measured = next((c for c in cals if c), None)
    lines = [f"result {d.get('result_id')}: chain {' -> '.join(names) or format_ids(d.get('chain'))}"]
    if measured:
        lines.append(f"temperatures fitted on {measured['n_fit']} validation samples; accuracy and calibration "
                     f"error (ECE, {measured['n_bins']} bins) measured on {measured['n_measured']} "
                     f"{measured['measured_on']} samples")
    rows = [[str(e.get("exit")), cell(e.get("result_id")), names[k], f"{e.get('temperature', 1.0):.3f}",
             _metric(c.get("accuracy")) if c else "-",
             f"{c['ece_before']:.4f} -> {c['ece_after']:.4f}" if c else "-", format_seconds(e.get("cost_s"))]
            for k, (e, c) in enumerate(zip(exits, cals, strict=True))]
    lines += ["", format_table(["EXIT", "RESULT", "MODEL", "T", "ACCURACY", "ECE BEFORE -> AFTER", "COST/SAMPLE"],
                               rows)]
    if d.get("reason"):
        lines += ["", f"note: {d['reason']}"]
    record: JSON | None = d.get("frontier")
    if record:
        lines += _render_frontier(record, names, points)
    return "\n".join(lines)


def _expected_cost(costs: Sequence[float], answered: Sequence[int], n: int) -> float:
    """Compute per input of a point: each tier's cost per sample times the share of inputs reaching it."""
    reach, total = n, 0.0
    for k, c in enumerate(costs):
        total += c * reach
        reach -= answered[k]
    return total / n


def _render_frontier(record: JSON, names: list[str], points: int) -> list[str]:
    costs = [float(c) for c in record.get("costs_s") or []]
    lines: list[str] = []
    for entry in record.get("entries") or []:
        e = int(entry["entry"])
        v, t = entry["validation"], entry.get("test")
        n = int(v["n"])
        limits: list[list[float]] = entry["limits"]
        chain = names[e:] or [str(k) for k in range(e, len(costs))]
        if len(chain) == 1:
            lines += ["", f"entry at {chain[0]}: one tier, nothing to trade: it answers everything (accuracy "
                          f"{v['top_correct'] / n:.4f} on validation)"]
            continue
        lines += ["", f"frontier entering at {chain[0]}: {len(limits)} points on {n} validation samples "
                      f"({' x '.join(map(str, entry['levels']))} candidate limits searched), "
                      f"{'all' if len(limits) <= points else points} shown, cheapest first; the top exit alone: "
                      f"accuracy {v['top_correct'] / n:.4f}"]

        cost = [_expected_cost(costs[e:], answered, n) for answered in v["answered"]]
        order = sorted(range(len(limits)), key=lambda p: (cost[p], -sum(v["correct"][p])))
        rows = []
        for p in (order[i] for i in _spread(len(order), points)):
            rows.append([", ".join("never" if x > 1 else f"{x:g}" for x in limits[p]),
                         " ".join(f"{100 * a / n:.0f}%" for a in v["answered"][p]), f"{sum(v['correct'][p]) / n:.4f}",
                         f"{(v['b'][p] - v['c'][p]) / n:+.4f}", format_seconds(cost[p]),
                         f"{sum(t['correct'][p]) / t['n']:.4f}" if t else "-"])
        lines.append(format_table(["LIMITS", "SHARES " + "/".join(chain), "ACCURACY", "DROP", "COST/INPUT",
                                   "TEST ACCURACY"], rows))
    return lines


@dataclass(frozen=True)
class Resource:
    """How one kind of resource is addressed and shown."""

    name: str
    path: str
    columns: tuple[str, ...]
    row: Callable[[JSON], list[str]]
    show: Callable[[JSON], str]

    @property
    def plural(self) -> str:
        return self.path.lstrip("/")


MODELS = Resource("model", "/models", ("ID", "NAME", "DISTRIBUTED", "UPPER", "LOWER", "VERSION", "PARAMS", "INPUT"),
                  model_row, render_model)
CONFIGURATIONS = Resource("configuration", "/configurations", ("ID", "NAME", "MODELS", "VERSION", "UPDATED"),
                          configuration_row, render_configuration)
DEPLOYMENTS = Resource("deployment", "/deployments",
                       ("ID", "CONFIGURATION", "BATCH", "EPOCHS", "OPTIMIZER", "LOSS", "RESULTS", "CREATED"),
                       deployment_row, render_deployment)
RESULTS = Resource("result", "/results", ("ID", "DEPLOYMENT", "MODEL", "NAME", "VERSION", "STATUS", "UPDATED"),
                   result_row, render_result)
DATASOURCES = Resource("datasource", "/datasources",
                       ("ID", "DEPLOYMENT", "FORMAT", "TOPIC", "RECORDS", "ANNOUNCED", "NOTES", "CREATED"),
                       datasource_row, render_datasource)


def render_list(resource: Resource, data: JSON) -> str:
    items: list[JSON] = data.get("items") or []
    if not items:
        return f"no {resource.plural}"
    text = format_table(resource.columns, [resource.row(item) for item in items])
    total = data.get("total")
    if isinstance(total, int) and total > len(items):
        text += f"\n({len(items)} of {total} shown; page with --limit and --offset)"
    return text


def render_created(resource: Resource, data: JSON, verb: str) -> str:
    shown = render_model(data, with_code=False) if resource is MODELS else resource.show(data)
    return f"{verb} {resource.name} {data.get('id')}\n{shown}"


def render_deleted(resource: Resource, data: JSON) -> str:
    return f"deleted {resource.name} {data.get('id')}"


# --- arguments to request bodies (pure; files are read through `read`) --------------------------------

def read_text(path: str) -> str:
    """A file's text ("-" for standard input); an unreadable file is a usage error."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot read {path}: it is not UTF-8 text") from None


def json_arg(text: str, flag: str, kinds: tuple[type, ...] = (dict,)) -> Any:
    """Parse a JSON-valued flag; never evaluates Python (Kafka-ML's `eval` of option strings is gone)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}") from None
    if not isinstance(value, kinds):
        names = " or ".join("a JSON object" if k is dict else "a JSON list" for k in kinds)
        raise UsageError(f"{flag} must be {names}, got {text!r}")
    return value


def spec_body(args: argparse.Namespace, read: Reader) -> JSON:
    """The `--file` body (a JSON object), or an empty one to fill from flags."""
    path: str | None = getattr(args, "file", None)
    if path is None:
        return {}
    body: JSON = json_arg(read(path), f"--file {path}")
    return body


def _model_fields(args: argparse.Namespace, read: Reader, body: JSON) -> JSON:
    if args.name is not None:
        body["name"] = args.name
    if args.code_file is not None:
        body["code"] = read(args.code_file)
    elif args.code is not None:
        body["code"] = args.code
    if args.description is not None:
        body["description"] = args.description
    if args.imports_file is not None:
        body["imports"] = read(args.imports_file)
    if args.upper_id is not None:
        body["upper_id"] = args.upper_id
    return body


def model_create_body(args: argparse.Namespace, read: Reader = read_text) -> JSON:
    body = _model_fields(args, read, spec_body(args, read))
    if args.distributed:
        body["distributed"] = True
    missing = [flag for key, flag in (("name", "--name"), ("code", "--code-file or --code")) if not body.get(key)]
    if missing:
        raise UsageError(f"models create needs {' and '.join(missing)} (or --file with a JSON body)")
    return body


def model_update_body(args: argparse.Namespace, read: Reader = read_text) -> JSON:
    body = _model_fields(args, read, spec_body(args, read))
    if args.distributed is not None:
        body["distributed"] = args.distributed
    if args.no_upper:
        if args.upper_id is not None:
            raise UsageError("give --upper-id or --no-upper, not both")
        body["upper_id"] = None
    if args.expected_version is not None:
        body["expected_version"] = args.expected_version
    if not set(body) - {"expected_version"}:
        raise UsageError("nothing to update: give --name, --code-file, --code, --description, --imports-file, "
                         "--distributed/--no-distributed, --upper-id/--no-upper or --file")
    return body


def configuration_create_body(args: argparse.Namespace, read: Reader = read_text) -> JSON:
    body = spec_body(args, read)
    if args.name is not None:
        body["name"] = args.name
    if args.description is not None:
        body["description"] = args.description
    if args.model:
        body["model_ids"] = list(args.model)
    missing = [flag for key, flag in (("name", "--name"), ("model_ids", "--model")) if not body.get(key)]
    if missing:
        raise UsageError(f"configurations create needs {' and '.join(missing)} (or --file with a JSON body)")
    return body


def deployment_create_body(args: argparse.Namespace, read: Reader = read_text) -> JSON:
    body = spec_body(args, read)
    if args.configuration is not None:
        body["configuration_id"] = args.configuration
    if args.batch is not None:
        body["batch"] = args.batch
    if args.fit_options is not None:
        body["fit_options"] = json_arg(args.fit_options, "--fit-options")
    if args.epochs is not None:
        body["fit_options"] = {**(body.get("fit_options") or {}), "epochs": args.epochs}
    if args.eval_options is not None:
        body["eval_options"] = json_arg(args.eval_options, "--eval-options")
    if args.optimizer is not None:
        body["optimizer"] = args.optimizer
    if args.learning_rate is not None:
        body["learning_rate"] = args.learning_rate
    if args.loss is not None:
        body["loss"] = args.loss
    if args.metric:
        body["metrics"] = list(args.metric)
    if args.loss_weights is not None:
        body["loss_weights"] = json_arg(args.loss_weights, "--loss-weights", (dict, list))
    if args.seed is not None:
        body["seed"] = args.seed
    if args.file is None:
        fit = body.get("fit_options")
        missing = [flag for flag, given in (("--configuration", "configuration_id" in body),
                                            ("--batch", "batch" in body),
                                            ("--epochs", isinstance(fit, dict) and "epochs" in fit)) if not given]
        if missing:
            raise UsageError(f"deployments create needs {', '.join(missing)} (or --file with a JSON body)")
    elif "configuration_id" not in body:
        raise UsageError("deployments create needs --configuration (or 'configuration_id' in --file)")
    return body


def delete_path(resource: Resource, ident: int, expected_version: int | None = None) -> str:
    path: str = with_query(f"{resource.path}/{ident}", {"expected_version": expected_version})
    return path


def list_path(resource: Resource, args: argparse.Namespace) -> str:
    params: dict[str, str | int | bool | None] = {"limit": args.limit, "offset": args.offset}
    if resource is MODELS:
        params |= {"distributed": True if args.distributed else None, "name": args.name}
    base = resource.path
    if resource is RESULTS and args.deployment is not None:
        base = f"/deployments/{args.deployment}/results"
    if resource is DATASOURCES:
        params["deployment_id"] = args.deployment
    path: str = with_query(base, params)
    return path


# --- handlers (the thin shell) ------------------------------------------------------------------------

def _command(action: Action, render: Callable[[JSON], str]) -> Handler:
    """A sub-command: run `action` against the API, print `render` of the answer (or the raw JSON)."""

    def handler(args: argparse.Namespace, settings: Settings) -> int:
        try:
            data = action(args, client_for(settings, getattr(args, "token", None) or ""))
        except UsageError as exc:
            print(format_error(exc), file=sys.stderr)
            return EXIT_USAGE
        except ApiClientError as exc:
            print(format_error(exc), file=sys.stderr)
            return EXIT_API_ERROR
        print(json.dumps(data, indent=2) if args.json else render(data))
        return 0

    return handler


def _list(resource: Resource) -> Handler:
    return _command(lambda args, api: api.get(list_path(resource, args))[1], lambda d: render_list(resource, d))


def _show(resource: Resource) -> Handler:
    return _command(lambda args, api: api.get(f"{resource.path}/{args.id}")[1], resource.show)


def _delete(resource: Resource) -> Handler:
    def action(args: argparse.Namespace, api: ApiClient) -> JSON:
        return api.delete(delete_path(resource, args.id, getattr(args, "expected_version", None)))[1]

    return _command(action, lambda d: render_deleted(resource, d))


def _create(resource: Resource, build: Callable[[argparse.Namespace], JSON]) -> Handler:
    return _command(lambda args, api: api.post(resource.path, build(args))[1],
                    lambda d: render_created(resource, d, "created"))


def _update_model(args: argparse.Namespace, api: ApiClient) -> JSON:
    return api.put(f"/models/{args.id}", model_update_body(args))[1]


# --- registration -------------------------------------------------------------------------------------

def _json_flag() -> argparse.ArgumentParser:
    """The flags every API sub-command takes: --json, and --token (else TIERFLOW_API_TOKEN, else the running
    stack's)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="print the API's JSON answer as it is (for scripts)")
    parent.add_argument("--token", metavar="TOKEN",
                        help="the API token (default: TIERFLOW_API_TOKEN, else the running stack's)")
    return parent


def _paging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=None, help="at most this many items (API default 100, max 1000)")
    p.add_argument("--offset", type=int, default=None, help="skip this many items")


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="unique model name (1..64 characters)")
    code = p.add_mutually_exclusive_group()
    code.add_argument("--code-file", metavar="PATH",
                      help="a Kafka-ML style Keras snippet (.py) or a Keras JSON config ('-' for stdin)")
    code.add_argument("--code", help="the model code inline")
    p.add_argument("--description")
    p.add_argument("--imports-file", metavar="PATH", help="Python imports the code needs")
    p.add_argument("--upper-id", type=int, metavar="ID",
                   help="the distributed model this one feeds (its upper tier); both must be --distributed")
    p.add_argument("--file", metavar="SPEC.json", help="the whole request body as JSON; flags override its fields")


def _register_common(sub: Any, resource: Resource, json_flag: argparse.ArgumentParser) -> None:
    lst = sub.add_parser("list", parents=[json_flag], help=f"list {resource.plural}")
    _paging(lst)
    if resource is MODELS:
        lst.add_argument("--distributed", action="store_true", help="only distributed models")
        lst.add_argument("--name", help="only models whose name contains this")
    if resource in (RESULTS, DATASOURCES):
        lst.add_argument("--deployment", type=int, metavar="ID", help=f"only the {resource.plural} of this deployment")
    lst.set_defaults(func=_list(resource))
    show = sub.add_parser("show", parents=[json_flag], help=f"show one {resource.name}")
    show.add_argument("id", type=int, metavar="ID")
    show.set_defaults(func=_show(resource))


def _register_delete(sub: Any, resource: Resource, json_flag: argparse.ArgumentParser, note: str) -> None:
    delete = sub.add_parser("delete", parents=[json_flag], help=f"delete a {resource.name}{note}")
    delete.add_argument("id", type=int, metavar="ID")
    if resource not in (DEPLOYMENTS, RESULTS):
        delete.add_argument("--expected-version", type=int, metavar="N",
                            help="refuse unless the current version is N (optimistic concurrency)")
    delete.set_defaults(func=_delete(resource))


def register(subparsers: Any) -> None:
    """Add `models`, `configurations`, `deployments`, `results` and `datasources` to the `tierflow` front door."""
    json_flag = _json_flag()

    models = subparsers.add_parser("models", help="register, list and delete Keras models")
    msub = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    _register_common(msub, MODELS, json_flag)
    create = msub.add_parser("create", parents=[json_flag], help="register a model (its code is built and checked)")
    _model_flags(create)
    create.add_argument("--distributed", action="store_true", help="a tier of an edge -> fog -> cloud chain")
    create.set_defaults(func=_create(MODELS, model_create_body))
    update = msub.add_parser("update", parents=[json_flag], help="change some fields of a model")
    update.add_argument("id", type=int, metavar="ID")
    _model_flags(update)
    update.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None)
    update.add_argument("--no-upper", action="store_true", help="clear the upper model")
    update.add_argument("--expected-version", type=int, metavar="N", help="refuse unless the current version is N")
    update.set_defaults(func=_command(_update_model, lambda d: render_created(MODELS, d, "updated")))
    _register_delete(msub, MODELS, json_flag, "")

    confs = subparsers.add_parser("configurations", help="group models to train together")
    csub = confs.add_subparsers(dest="action", required=True, metavar="ACTION")
    _register_common(csub, CONFIGURATIONS, json_flag)
    create = csub.add_parser("create", parents=[json_flag],
                             help="create a configuration (a chain's top model brings its lower tiers)")
    create.add_argument("--name")
    create.add_argument("--description")
    create.add_argument("--model", type=int, action="append", metavar="ID", help="a model id (repeat for more)")
    create.add_argument("--file", metavar="SPEC.json", help="the whole request body as JSON; flags override it")
    create.set_defaults(func=_create(CONFIGURATIONS, configuration_create_body))
    _register_delete(csub, CONFIGURATIONS, json_flag, "")

    deps = subparsers.add_parser("deployments", help="train configurations")
    dsub = deps.add_subparsers(dest="action", required=True, metavar="ACTION")
    _register_common(dsub, DEPLOYMENTS, json_flag)
    create = dsub.add_parser("create", parents=[json_flag], help="deploy a configuration for training")
    create.add_argument("--configuration", type=int, metavar="ID")
    create.add_argument("--batch", type=int, metavar="N", help="batch size")
    create.add_argument("--epochs", type=int, metavar="E", help="training epochs (fit_options.epochs)")
    create.add_argument("--optimizer", help="adam, sgd, rmsprop, ... (default adam)")
    create.add_argument("--learning-rate", type=float, metavar="LR")
    create.add_argument("--loss", help="a Keras loss name (default sparse_categorical_crossentropy)")
    create.add_argument("--metric", action="append", metavar="NAME", help="a Keras metric (repeat for more)")
    create.add_argument("--fit-options", metavar="JSON", help='Keras fit() options, e.g. \'{"shuffle": true}\'')
    create.add_argument("--eval-options", metavar="JSON", help='Keras evaluate() options, e.g. \'{"steps": 10}\'')
    create.add_argument("--loss-weights", metavar="JSON", help="one weight per exit (list) or {model_id: weight}")
    create.add_argument("--seed", type=int, metavar="N",
                        help="train reproducibly with this seed: the same data gives the same weights and metrics "
                             "(default: a drawn seed, shown on the results)")
    create.add_argument("--file", metavar="SPEC.json", help="the whole request body as JSON; flags override it")
    create.set_defaults(func=_create(DEPLOYMENTS, deployment_create_body))
    _register_delete(dsub, DEPLOYMENTS, json_flag, " and its results")
    results = dsub.add_parser("results", parents=[json_flag], help="the training results of a deployment")
    results.add_argument("id", type=int, metavar="ID")
    _paging(results)
    results.set_defaults(func=_command(
        lambda args, api: api.get(with_query(f"/deployments/{args.id}/results",
                                             {"limit": args.limit, "offset": args.offset}))[1],
        lambda d: render_list(RESULTS, d)))

    res = subparsers.add_parser("results", help="training results (one per model of a deployment)")
    rsub = res.add_subparsers(dest="action", required=True, metavar="ACTION")
    _register_common(rsub, RESULTS, json_flag)
    stop = rsub.add_parser("stop", parents=[json_flag], help="stop the training of a result (its whole chain)")
    stop.add_argument("id", type=int, metavar="ID")
    stop.set_defaults(func=_command(lambda args, api: api.post(f"/results/{args.id}/stop", {})[1],
                                    lambda d: render_list(RESULTS, d)))
    _register_delete(rsub, RESULTS, json_flag, " (one no inference uses)")
    exits = rsub.add_parser("exits", parents=[json_flag],
                            help="the calibration of each exit of a result's chain and its exit frontier")
    exits.add_argument("id", type=int, metavar="ID", help="any result of the chain")
    exits.set_defaults(func=_command(lambda args, api: api.get(f"/results/{args.id}/exits")[1],
                                     render_exits))

    sources = subparsers.add_parser("datasources", help="training data announced for deployments (announced vs "
                                                        "used ranges, and why they differ)")
    ssub = sources.add_subparsers(dest="action", required=True, metavar="ACTION")
    _register_common(ssub, DATASOURCES, json_flag)
