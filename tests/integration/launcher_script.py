"""The workload the local launcher's tests run: `python -c SCRIPT ... MODE`, or forked from the tier zygote
(`main(args)`, the zygote's entry point in those tests: it runs the same script in-process)."""

from __future__ import annotations

import sys

SCRIPT = """
import os, signal, sys, time
mode = sys.argv[-1]
print(f"workload {mode} pid={os.getpid()} x={os.environ.get('TIERFLOW_X')} y={os.environ.get('TIERFLOW_Y')} "
      f"token={os.environ.get('TIERFLOW_API_TOKEN')} db={os.environ.get('DATABASE_URL')}", flush=True)
if mode == "ok":
    sys.exit(0)
if mode == "crash":
    for i in range(30):
        print(f"step {i}")
    print("ValueError: record 17 has 783 bytes, expected 784", file=sys.stderr)
    sys.exit(3)
if mode == "raise":
    raise ValueError("an exception nobody caught")
if mode == "interrupt":
    raise KeyboardInterrupt
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "polite":
    signal.signal(signal.SIGTERM, lambda signum, frame: (print("got SIGTERM, draining", flush=True), sys.exit(0)))
if mode == "child":  # leaves a grandchild in the workload's process group
    import subprocess
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def main(args: list[str]) -> int:
    """The zygote's entry: `tierflow <args>` is this script with `args` as its arguments."""
    sys.argv = ["-c", *args]
    exec(compile(SCRIPT, "<launcher script>", "exec"), {"__name__": "__main__"})
    return 0


def start_a_thread() -> None:
    """A preload that leaves a thread running: the zygote must refuse to fork."""
    import threading
    import time

    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
