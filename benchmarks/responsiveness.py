"""Responsiveness benchmark: what a user of one machine meets while the stack idles, and when it wakes up.

Run: `python benchmarks/responsiveness.py [--idle-s 30] [--gap-s 60] [--writes 3] [--burst 10] [--tier-runs 3]
[--demo-runs 1] [--skip idle,writes,burst,tiers,demo]` (all parts: ~12 min on the 2-core machine, most of it the
writes' silences).

Starts the embedded stack as a user does (`tierflow up --detach`, in a private TIERFLOW_HOME with free ports),
waits until its start-up work is over (the CPU of its processes settles), and measures from outside, through
/proc and the public API only:

  1. idle CPU: CPU seconds (utime + stime of /proc/<pid>/stat) of every process of the stack over --idle-s,
     by component (broker, Postgres, worker, sandbox, API, workloads), and each process's requests per second
     to the broker (data segments sent on its broker connections, from `ss -ti`; Linux only). CPU time, not
     wall-clock shares: other load on a shared machine moves it little. Target (issue 12): <= 5% of one core.
  2. the first write after idle: `POST /configurations` after --gap-s of silence, --writes times; baseline:
     the same write repeated at 10/s right after (the stack awake). Target: p99 <= 150 ms.
  3. a burst of --burst distinct small models, `POST /models` back to back: each one's latency, and the
     memory (RSS and PSS) of the validation sandbox processes before and after. Targets: each <= 1 s, the
     pool's idle memory <= 2 GiB.

  4. the tiers' start-up: the demo's chain trained once on this stack (`tierflow demo --dataset digits --keep`),
     then `POST /inferences` of it --tier-runs times per engine, each timed from the POST to the first answer of
     each tier (one probe per tier, sent as soon as the orchestrator made the topics; the tier reads it when it
     joined its group and loaded its model); the engine a tier picks by itself first (auto: LiteRT, the result
     has a .tflite), then Keras (the stack restarted with TIERFLOW_TIER_ENGINE=keras). Baseline: the POST's own
     201. Target: every tier's first answer <= 15 s. Medians per tier, every run printed, each with the tiers'
     memory (PSS, the tier zygote's included) once all answered.
  5. the demo's total time: `tierflow demo --dataset digits` in a fresh home, as a newcomer runs it (it starts
     the stack and stops it), --demo-runs times; the tiers' first answers as it prints them. Target <= 60 s.

Wall-clock figures (2-5) move with other load on the machine; CPU time (1) much less. Run it on a quiet machine
for the figures that count, and compare each with its baseline printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierflow.deploy.client import ApiClient
from tierflow.deploy.stack import StackState, read_stack_state

MODELS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "kafka_ml_models"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- processes of the stack (Linux /proc) ----------------------------------------------------------------------

@dataclass(frozen=True)
class Proc:
    pid: int
    component: str
    cmdline: str


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry))
    return children


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def component_of(cmdline: str, parent: str = "") -> str:
    """Which part of the stack a process belongs to, from its command line and its parent's (pure)."""
    if "deploy.local_zygote" in cmdline:  # the tier zygote, or a tier it forked (which keeps its command line)
        return "tiers" if "deploy.local_zygote" in parent else "zygote"
    rules = (("tansu", "broker"), ("postgres", "postgres"), ("tierflow.tiers.sandbox", "sandbox"),
             ("cli worker", "worker"), ("cli api", "api"), ("cli up", "supervisor"), (" tier run", "tiers"),
             ("runuser", "postgres"))
    for needle, name in rules:
        if needle in cmdline:
            return name
    return "workloads"


def stack_processes(root: int) -> list[Proc]:
    """Every process under the stack's supervisor (its process tree)."""
    children = _children()
    found, todo = [], [(root, "")]
    while todo:
        pid, parent = todo.pop()
        cmd = _cmdline(pid)
        if cmd:
            found.append(Proc(pid, component_of(cmd, parent), cmd))
        todo.extend((child, cmd) for child in children.get(pid, []))
    return found


def tier_processes(root: int, home: Path) -> list[int]:
    """The tiers' processes: under the stack, the tier zygote and what it forked; elsewhere, what a plain launch
    detached (`local_launcher run <home>/workloads/tierflow-infer-...`, reparented away from the stack, and its
    workload)."""
    pids = {p.pid for p in stack_processes(root) if p.component in ("tiers", "zygote")}
    marker = f"local_launcher run {home.resolve()}/workloads/tierflow-infer-"
    children = _children()
    todo = [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and marker in _cmdline(int(entry))]
    while todo:
        pid = todo.pop()
        pids.add(pid)
        todo.extend(children.get(pid, []))
    return sorted(pids)


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB from /proc/<pid>/smaps_rollup; (0, 0) when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(Rss|Pss):\s+(\d+) kB", text, re.M)}
    return values.get("Rss", 0), values.get("Pss", 0)


def broker_requests(port: int) -> dict[int, int] | None:
    """Data segments each process has sent on its connections to the broker so far (one Kafka request is at
    least one segment); None without `ss`."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(["ss", "-tinpH", f"dport = :{port}"], capture_output=True, text=True, check=False).stdout
    sent: dict[int, int] = defaultdict(int)
    pid = None
    for line in out.splitlines():
        owner = re.search(r"pid=(\d+)", line)
        if owner:
            pid = int(owner.group(1))
        segments = re.search(r"data_segs_out:(\d+)", line)
        if segments and pid is not None:
            sent[pid] += int(segments.group(1))
    return dict(sent)


#: Components that run for as long as the stack does; anything else (sandboxes starting, workloads) is start-up
#: or deployed work.
PERMANENT = frozenset({"supervisor", "broker", "postgres", "worker", "api"})


def settle(root: int, *, window_s: float = 3.0, limit_s: float = 180.0) -> float:
    """Wait until the stack's start-up work is over: no process outside the permanent components uses more than
    2% of one core, and the stack's total CPU moved by less than 5% of one core, over two windows of `window_s`
    (an idle stack has a steady cost of its own, so no absolute threshold); the seconds it took."""
    started = time.monotonic()
    previous: float | None = None
    while time.monotonic() - started < limit_s:
        procs = stack_processes(root)
        before = {p.pid: cpu_seconds(p.pid) or 0.0 for p in procs}
        time.sleep(window_s)  # the measurement window itself
        used = {p.pid: (cpu_seconds(p.pid) or before[p.pid]) - before[p.pid] for p in procs}
        total = sum(used.values()) / window_s
        quiet = all(used[p.pid] / window_s < 0.02 for p in procs if p.component not in PERMANENT)
        if quiet and previous is not None and abs(total - previous) < 0.05:
            break
        previous = total
    return time.monotonic() - started


def idle_cpu(state: StackState, seconds: float) -> float:
    """Print CPU per process and component over `seconds`; the total as a share of one core."""
    port = int(state.bootstrap_servers.rsplit(":", 1)[1])
    procs = stack_processes(state.pid)
    before = {p.pid: cpu_seconds(p.pid) for p in procs}
    sent_before = broker_requests(port)
    time.sleep(seconds)  # the measurement window itself
    sent_after = broker_requests(port)
    by_component: dict[str, float] = defaultdict(float)
    print(f"\nidle CPU over {seconds:g} s (nothing deployed; utime + stime from /proc):")
    rows = []
    for p in procs:
        start, end = before[p.pid], cpu_seconds(p.pid)
        if start is None or end is None:
            continue
        used = end - start
        by_component[p.component] += used
        requests = None
        if sent_before is not None and sent_after is not None:
            requests = (sent_after.get(p.pid, 0) - sent_before.get(p.pid, 0)) / seconds
        rows.append((used, p, requests))
    for used, p, requests in sorted(rows, key=lambda r: -r[0]):
        if used <= 0 and not requests:
            continue
        req = "" if requests is None else f"  {requests:7.1f} requests/s to the broker"
        print(f"  {used:6.2f} s {100 * used / seconds:5.1f}%  {p.component:<10} pid {p.pid:<7}{req}  {p.cmdline[:60]}")
    total = sum(by_component.values())
    print("  by component: " + ", ".join(f"{name} {100 * cpu / seconds:.1f}%"
                                         for name, cpu in sorted(by_component.items(), key=lambda kv: -kv[1])))
    print(f"  total {total:.2f} CPU s = {100 * total / seconds:.1f}% of one core (target <= 5%)")
    return total / seconds


# -- writes ----------------------------------------------------------------------------------------------------

def timed(api: ApiClient, path: str, body: dict[str, object]) -> float:
    started = time.perf_counter()
    status, _ = api.post(path, body)
    elapsed = time.perf_counter() - started
    if status not in (200, 201):
        raise RuntimeError(f"POST {path} answered {status}")
    return elapsed * 1000


def first_writes(api: ApiClient, model_id: int, gap_s: float, writes: int) -> None:
    print(f"\nfirst write after {gap_s:g} s idle (POST /configurations), {writes} times:")
    cold = []
    for i in range(writes):
        time.sleep(gap_s)  # the silence being measured
        cold.append(timed(api, "/configurations", {"name": f"idle-{time.time_ns()}-{i}", "model_ids": [model_id]}))
        print(f"  after {gap_s:g} s idle: {cold[-1]:.1f} ms", flush=True)
    warm = []
    for i in range(50):
        started = time.perf_counter()
        warm.append(timed(api, "/configurations", {"name": f"warm-{time.time_ns()}-{i}", "model_ids": [model_id]}))
        time.sleep(max(0.0, 0.1 - (time.perf_counter() - started)))  # pacing at 10/s
    print(f"  first writes: p50 {pct(cold, .5):.1f} ms, max {max(cold):.1f} ms (target p99 <= 150 ms); "
          f"baseline, the same write awake at 10/s: p50 {pct(warm, .5):.1f} ms, p99 {pct(warm, .99):.1f} ms")


def sandbox_memory(state: StackState) -> tuple[int, int, int]:
    """(processes, RSS MiB, PSS MiB) of the validation sandboxes."""
    pids = [p.pid for p in stack_processes(state.pid) if p.component == "sandbox"]
    rss = pss = 0
    for pid in pids:
        r, p = memory_kib(pid)
        rss, pss = rss + r, pss + p
    return len(pids), rss // 1024, pss // 1024


def model_burst(api: ApiClient, state: StackState, count: int) -> None:
    n, rss, pss = sandbox_memory(state)
    print(f"\nburst of {count} distinct small models (POST /models back to back); sandboxes before: {n} processes, "
          f"RSS {rss} MiB, PSS {pss} MiB")
    latencies = []
    tag = time.time_ns()
    for i in range(count):
        code = (f"inputs = keras.Input(shape=(8,))\nx = keras.layers.Dense({8 + i}, activation=tf.nn.relu)(inputs)\n"
                f"outputs = keras.layers.Dense(2, activation='softmax')(x)\n"
                f"model_{i} = keras.Model(inputs=[inputs], outputs=[outputs])\n")
        latencies.append(timed(api, "/models", {"name": f"burst-{tag}-{i}", "code": code}))
    print("  each (ms): " + ", ".join(f"{v:.0f}" for v in latencies))
    print(f"  p50 {pct(latencies, .5):.0f} ms, max {max(latencies):.0f} ms (target each <= 1,000 ms)")
    n, rss, pss = sandbox_memory(state)
    print(f"  sandboxes after: {n} processes, RSS {rss} MiB, PSS {pss} MiB (target idle pool <= 2,048 MiB)")


# -- tiers -----------------------------------------------------------------------------------------------------

#: The demo chain's tensor between tiers: 64 features (deploy/demo_data.py's models; its warm-up probes alike).
TENSOR_WIDTH = 64


def cli(home: Path, *args: str, extra_env: dict[str, str] | None = None, timeout_s: float = 900
        ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TIERFLOW_HOME": str(home), "TIERFLOW_API_PORT": "0", **(extra_env or {})}
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "TIERFLOW_API_URL", "TIERFLOW_API_TOKEN"):
        env.pop(name, None)  # the embedded stack of `home`, not an external one
    return subprocess.run([sys.executable, "-m", "tierflow.deploy.cli", *args], env=env, capture_output=True,
                          text=True, check=False, timeout=timeout_s)


def trained_chain(api: ApiClient, home: Path) -> dict[str, Any]:
    """Train the demo's chain on the running stack (`tierflow demo --keep`); its inference's description (then
    stopped), whose first tier's result the measured inferences serve."""
    summary_path = home / "demo-summary.json"
    started = time.perf_counter()
    done = cli(home, "demo", "--dataset", "digits", "--keep", "--json", str(summary_path))
    if done.returncode != 0:
        raise RuntimeError(f"tierflow demo failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
    summary = json.loads(summary_path.read_text())
    _, inference = api.get(f"/inferences/{summary['inference_id']}")
    api.post(f"/inferences/{summary['inference_id']}/stop")
    print(f"\nthe demo's chain trained on this stack in {time.perf_counter() - started:.0f} s "
          f"(inference {summary['inference_id']} stopped; its result {inference['tiers'][0]['result_id']} is served "
          "below)")
    return dict(inference)


def probe(inference: dict[str, Any], tier: dict[str, Any]) -> tuple[bytes, Any]:
    """One input for `tier`: a raw sample of the inference's input config for the first tier, a tensor above."""
    from tierflow.streams import wire

    if tier["index"] != 0:
        return wire.encode_tensor(np.zeros((1, TENSOR_WIDTH), dtype=np.float32))
    config = inference.get("input_config") or {}
    shape = [int(d) for d in str(config.get("data_reshape") or "").split()] or [TENSOR_WIDTH]
    return np.zeros(shape, dtype=str(config.get("data_type") or "float32")).tobytes(), None


async def first_answers(api: ApiClient, bootstrap: str, template: dict[str, Any], tag: str, root: int,
                        home: Path) -> tuple[float, list[float], float]:
    """POST /inferences of the template's chain on fresh topics; (seconds to its 201, seconds from the POST to
    each tier's first answer, the tiers' memory in MiB once all answered: PSS, the tier zygote's included)."""
    from aiokafka import TopicPartition

    from tierflow.streams import kafka as kio
    from tierflow.streams import wire
    from tierflow.streams.settings import KafkaSettings
    from tierflow.streams.topics import admin_client, partition_counts

    body = {"result_id": template["tiers"][0]["result_id"], "input_topic": f"bench.{tag}.in",
            "output_topic": f"bench.{tag}.out", "limit": 0.8}
    started = time.perf_counter()
    _, inference = await asyncio.to_thread(api.post, "/inferences", body)
    posted = time.perf_counter() - started
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    tiers = inference["tiers"]
    topics = [inference["output_topic"], *(t["input_topic"] for t in tiers)]
    admin = admin_client(kafka)
    await admin.start()
    try:  # the orchestrator creates them; written to before, Tansu would auto-create them its own way
        while set(topics) - set(await admin.list_topics()):
            if time.perf_counter() - started > 120:
                raise RuntimeError(f"the topics of inference {inference['id']} were not created within 120 s")
            await asyncio.sleep(0.05)
        counts = await partition_counts(admin, [inference["output_topic"]])
    finally:
        await admin.close()
    producer, consumer = kio.producer(kafka), kio.consumer(kafka)
    await producer.start()
    await consumer.start()
    answered: dict[int, float] = {}
    try:
        tps = [TopicPartition(inference["output_topic"], p) for p in range(counts[inference["output_topic"]])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        waiting = {t["input_topic"]: int(t["index"]) for t in tiers}
        for t in tiers:
            value, headers = probe(inference, t)
            await producer.send_and_wait(t["input_topic"], value, headers=headers)
        while waiting:
            batch = await consumer.getmany(timeout_ms=20)
            now = time.perf_counter() - started
            for record in (r for records in batch.values() for r in records):
                for answer in wire.read_answers(record.value):
                    index = waiting.pop(answer.origin[0], None)
                    if index is not None:
                        answered[index] = now
            if now > 300:
                raise RuntimeError(f"tiers {sorted(waiting.values())} did not answer within 300 s")
        memory = sum(memory_kib(pid)[1] for pid in tier_processes(root, home))
    finally:
        await consumer.stop()
        await producer.stop()
        await asyncio.to_thread(api.post, f"/inferences/{inference['id']}/stop")
    return posted, [answered[i] for i in sorted(answered)], memory / 1024


def wait_tiers_gone(state: StackState, home: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while any(p.component == "tiers" for p in stack_processes(state.pid)) or any(
            "local_launcher" in _cmdline(pid) or " tier run" in _cmdline(pid)
            for pid in tier_processes(state.pid, home)):
        if time.monotonic() > deadline:
            raise RuntimeError("the stopped inference's tier processes did not exit")
        time.sleep(0.1)  # polling interval of a condition with a deadline


def tier_start_up(home: Path, state: StackState, api: ApiClient, runs: int) -> None:
    template = trained_chain(api, home)
    for engine in ("auto", "keras"):
        if engine == "keras":  # the engine is the stack's setting: restart it so its tiers use Keras
            stop_stack(home)
            state = start_stack(home, {"TIERFLOW_TIER_ENGINE": "keras"})
            settle(state.pid)
            api_url, token = stack_access(home)
            api = ApiClient(api_url, token, poll_interval_s=0.02)
        label = "auto (LiteRT: the result has a .tflite)" if engine == "auto" else "keras (TIERFLOW_TIER_ENGINE)"
        print(f"\ntiers' first answers after POST /inferences, engine {label}, {runs} runs:")
        per_tier: list[list[float]] = []
        posts = []
        for run in range(runs):
            wait_tiers_gone(state, home)
            settle(state.pid)
            posted, answers, memory = asyncio.run(first_answers(api, state.bootstrap_servers, template,
                                                                f"{engine}-{run}-{time.time_ns()}", state.pid,
                                                                home))
            posts.append(posted)
            per_tier.append(answers)
            print("  run {}: POST -> 201 {:.0f} ms; first answers: {}; tiers' PSS {:.0f} MiB".format(
                run + 1, posted * 1000, ", ".join(f"tier {k} {s:.1f} s" for k, s in enumerate(answers)), memory),
                flush=True)
        medians = [statistics.median(column) for column in zip(*per_tier, strict=True)]
        print("  median: " + ", ".join(f"tier {k} {m:.1f} s" for k, m in enumerate(medians))
              + f" (target each <= 15 s); baseline, the POST's own 201: median "
              f"{statistics.median(posts) * 1000:.0f} ms")
    stop_stack(home)


def demo_total(runs: int) -> None:
    print(f"\nthe demo end to end (`tierflow demo --dataset digits` in a fresh home: it starts and stops its stack), "
          f"{runs} runs:")
    totals = []
    for run in range(runs):
        home = Path(tempfile.mkdtemp(prefix="tierflow-bench-demo-", dir="/tmp"))
        home.chmod(0o755)
        try:
            started = time.perf_counter()
            done = cli(home, "demo", "--dataset", "digits")
            totals.append(time.perf_counter() - started)
            if done.returncode != 0:
                raise RuntimeError(f"tierflow demo failed ({done.returncode}): {done.stdout[-2000:]}"
                                   f"{done.stderr[-2000:]}")
            tiers = re.findall(r"tier (\d+) answers \(([\d.]+) s\)", done.stdout)
            print(f"  run {run + 1}: {totals[-1]:.1f} s in all; the tiers answered their probes "
                  + ", ".join(f"{s} s (tier {k})" for k, s in tiers) + " after the demo's warm-up began", flush=True)
        finally:
            cli(home, "down")
            shutil.rmtree(home, ignore_errors=True)
    print(f"  median {statistics.median(totals):.1f} s (target <= 60 s)")


# -- main ------------------------------------------------------------------------------------------------------

def start_stack(home: Path, extra_env: dict[str, str] | None = None) -> StackState:
    env = {**os.environ, "TIERFLOW_HOME": str(home), "TIERFLOW_API_PORT": "0", **(extra_env or {})}
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "TIERFLOW_API_URL", "TIERFLOW_API_TOKEN"):
        env.pop(name, None)  # the embedded stack, not an external one
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tierflow.deploy.cli", "up", "--detach"], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tierflow up failed ({done.returncode}): {done.stdout}{done.stderr}")
    state = read_stack_state(home)
    if state is None:
        raise RuntimeError(f"tierflow up said it is up, but {home}/stack.json is missing")
    print(f"stack up in {time.perf_counter() - started:.1f} s (tierflow up --detach, home {home})")
    return state


def stack_access(home: Path) -> tuple[str, str]:
    """The API's URL and token, as a script gets them: `tierflow status --json`."""
    env = {**os.environ, "TIERFLOW_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "tierflow.deploy.cli", "status", "--json"], env=env,
                          capture_output=True, text=True, check=False)
    body = json.loads(done.stdout)
    return str(body["api_url"]), str(body.get("token") or "")


def stop_stack(home: Path) -> None:
    env = {**os.environ, "TIERFLOW_HOME": str(home)}
    subprocess.run([sys.executable, "-m", "tierflow.deploy.cli", "down"], env=env, capture_output=True, check=False)


def main(args: argparse.Namespace) -> int:
    home = Path(tempfile.mkdtemp(prefix="tierflow-bench-resp-", dir="/tmp"))
    home.chmod(0o755)  # Postgres runs as its own user when we are root: it must traverse the home
    try:
        state = start_stack(home)
        took = settle(state.pid)
        print(f"start-up work settled {took:.1f} s later (sandboxes quiet, the stack's CPU steady over 2 x 3 s)")
        api_url, token = stack_access(home)
        api = ApiClient(api_url, token, poll_interval_s=0.02)
        if "idle" not in args.skip:
            idle_cpu(state, args.idle_s)
        if args.writes and "writes" not in args.skip:
            _, model = api.post("/models", {"name": "single", "code": (MODELS / "single.py").read_text()})
            settle(state.pid)
            first_writes(api, int(model["id"]), args.gap_s, args.writes)
        if args.burst and "burst" not in args.skip:
            settle(state.pid)
            model_burst(api, state, args.burst)
        if args.tier_runs and "tiers" not in args.skip:
            settle(state.pid)
            tier_start_up(home, state, api, args.tier_runs)
        stop_stack(home)
        if args.demo_runs and "demo" not in args.skip:
            demo_total(args.demo_runs)
        return 0
    finally:
        stop_stack(home)
        if args.keep:
            print(f"logs kept in {home / 'logs'}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-s", type=float, default=30.0, help="idle CPU window (default 30 s)")
    parser.add_argument("--gap-s", type=float, default=60.0, help="silence before each first write (default 60 s)")
    parser.add_argument("--writes", type=int, default=3, help="first writes after idle (default 3; 0 = skip)")
    parser.add_argument("--burst", type=int, default=10, help="models registered back to back (default 10; 0 = skip)")
    parser.add_argument("--tier-runs", type=int, default=3, help="inferences started per engine (default 3; 0 = skip)")
    parser.add_argument("--demo-runs", type=int, default=1, help="demos run end to end (default 1; 0 = skip)")
    parser.add_argument("--skip", type=lambda text: set(text.split(",")), default=set(), metavar="PARTS",
                        help="parts to leave out: idle,writes,burst,tiers,demo")
    parser.add_argument("--keep", action="store_true", help="keep the stack's logs")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
