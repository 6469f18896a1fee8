"""The sandboxed trainer: builds and trains the model code of one training job, beside nothing it could abuse.

Started by the training job's driver (tiers/train_sandbox.py) as `python -m tierflow.tiers.trainer`, under the
isolation level of TIERFLOW_SANDBOX_ISOLATION, with a scrubbed environment (no token, no database URL) and no
network. Everything it knows comes from its **exchange directory**, which the driver fills and reads back:

    in:   job.json   {"versions": [{"name", "model_id", "version", "code", "imports"}...] bottom first,
                      "options": TrainingOptions as a dict}
          x.npy, y.npy   the samples and labels the driver read from Kafka (loaded with allow_pickle=False)
    out:  result.json    {"metrics": [per exit {"train", "validation", "test"}], "artefacts": [per sub-model
                          {"keras": file, "tflite": file}], "seconds_per_sample": [per sub-model]}
          model_<i>.keras, model_<i>.tflite      the trained sub-models
          probs_<split>_<i>.npy                  exit i's probabilities on the validation and test splits (the
                                                 driver's calibration and frontier record reads them)

and its channel (a pipe to the driver) carries one JSON line per event: `{"ready": true, "isolation": {...}}`,
`{"progress": {"epoch", "epochs", "metrics"}}` per epoch, then `{"done": true}` or `{"error": reason,
"permanent": bool}`. The driver trusts none of it: it checks every file and line (tiers/train_sandbox.py).

Confinement, before TensorFlow or any model code loads (the same steps as the validation sandbox,
tiers/sandbox_child.py):

* `bwrap`: bwrap gives it its own pid, network, IPC and mount namespaces with a read-only view of the system
  and installation and the exchange directory as its only writable folder; it drops root if it has it, then
  forks the trainer proper into a user, pid and mount namespace of its own (a private /tmp, RLIMIT_NPROC
  counting its own tasks only), as PID 1: anything it starts dies with it.
* `landlock`: Landlock (read-only system and installation, its own /proc entry, writes only to the exchange
  directory) and seccomp (no sockets, no new processes, no signals to others; tiers/sandbox_confine.py).
* `none`: only the scrubbed environment and the limits.

Then its limits: address space (TIERFLOW_SANDBOX_TRAINING_MEMORY_MB on top of TensorFlow's), file size (the
largest artefact), processes; no CPU limit (a training takes what it takes; the driver or its Job stops it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from tierflow.tiers import sandbox_child, sandbox_confine
from tierflow.tiers.sandbox_bwrap import installation_paths

if TYPE_CHECKING:  # numpy starts OpenBLAS's threads when imported: only after the namespaces are entered
    pass

#: Where the exchange directory is inside bwrap (the driver binds its own folder there).
EXCHANGE = "/exchange"
JOB, X, Y, RESULT = "job.json", "x.npy", "y.npy", "result.json"
#: The largest file the trainer may write (its RLIMIT_FSIZE): an artefact never exceeds it.
MAX_FILE_BYTES = 1 << 30
#: Processes and threads model code may add to the trainer's (TensorFlow's pools and tf.data's included).
NPROC_MARGIN = 256


def probs_name(split: str, exit_index: int) -> str:
    return f"probs_{split}_{exit_index}.npy"


class _Channel:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def send(self, message: dict[str, Any]) -> None:
        data = orjson.dumps(message, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]


# -- what the trainer does, once confined ------------------------------------------------------------------


class _Progress:
    def __init__(self, channel: _Channel) -> None:
        self.channel = channel

    def progress(self, epoch: int, epochs: int, metrics: list[dict[str, float]]) -> None:
        self.channel.send({"progress": {"epoch": epoch, "epochs": epochs, "metrics": metrics}})


def train_job(exchange: Path, channel: _Channel, memory_mb: int | None, *, nproc: bool,
              own_user_namespace: bool) -> dict[str, Any]:
    """Read the job, train, write the outputs; the final message for the driver."""
    import numpy as np

    from tierflow.streams.errors import PermanentError
    from tierflow.tiers import keras_code, training

    job = orjson.loads((exchange / JOB).read_bytes())
    names = {f.name for f in fields(training.TrainingOptions)}
    options = training.TrainingOptions(**{k: v for k, v in job["options"].items() if k in names})
    x = np.load(exchange / X, allow_pickle=False)
    y = np.load(exchange / Y, allow_pickle=False)
    tf, _ = keras_code.load_keras()
    tf.constant(1.0) + 1.0  # the eager context and its thread pools exist before the process limit is set
    limits = sandbox_child.apply_limits(memory_mb, None, own_user_namespace=own_user_namespace, nproc=nproc,
                                        file_bytes=MAX_FILE_BYTES, nproc_margin=NPROC_MARGIN)
    try:
        training.seed_randomness(options)  # before the model code builds its layers: their initial weights too
        models = []
        for version in job["versions"]:
            label = (f"model '{version.get('name')}' (id {version.get('model_id')}, version "
                     f"{version.get('version')})")
            try:
                models.append(keras_code.build_model(str(version.get("code") or ""),
                                                     str(version.get("imports") or "")))
            except keras_code.ModelCodeError as exc:
                return {"error": f"{label}: {exc.message}", "permanent": True}
        per_exit = training.train(models, x, y, options, _Progress(channel))
        artefacts: list[dict[str, str]] = []
        for i, model in enumerate(models):
            files = {"keras": f"model_{i}.keras"}
            (exchange / files["keras"]).write_bytes(training.export_keras(model).data)
            try:
                tflite = training.export_tflite(model)
            except Exception as exc:  # the converter raises many types; the Keras artefact still serves
                print(f"{getattr(model, 'name', 'model')}: no LiteRT artefact, the converter failed: {exc}",
                      file=sys.stderr, flush=True)
            else:
                files["tflite"] = f"model_{i}.tflite"
                (exchange / files["tflite"]).write_bytes(tflite.data)
            artefacts.append(files)
        # Each exit's outputs on the validation and test splits, run as the tiers run the chain, and each
        # sub-model's compute per sample: what the driver's calibration and exit frontier are made of.
        outputs = training.exit_probabilities(models, x, y, options)
        for split, per_exit_probs in (("validation", outputs.val_probs), ("test", outputs.test_probs)):
            for i, probs in enumerate(per_exit_probs):
                np.save(exchange / probs_name(split, i), probs, allow_pickle=False)
        result = {"metrics": per_exit, "artefacts": artefacts, "seconds_per_sample": outputs.costs_s}
        (exchange / RESULT).write_bytes(orjson.dumps(result))
        return {"done": True, "limits": limits}
    except PermanentError as exc:  # TrainingSetupError, DataError: the user can act on the reason
        return {"error": f"training: {getattr(exc, 'message', None) or exc}", "permanent": True}
    except MemoryError:
        return {"error": f"MemoryError: the training needs more than the {memory_mb} MB of memory the trainer "
                         "allows on top of TensorFlow (TIERFLOW_SANDBOX_TRAINING_MEMORY_MB)", "permanent": True}
    except Exception as exc:  # a bug of ours or of TensorFlow's: the driver reports it as temporary
        return {"error": f"training: {training.short_message(exc)}", "permanent": False}


# -- confinement ---------------------------------------------------------------------------------------------


def _confined_landlock(exchange: Path) -> dict[str, str]:
    sandbox_confine.prepare()
    if os.getuid() == 0:
        sandbox_child.drop_capabilities()
    sandbox_child.set_dumpable(False)
    report = sandbox_confine.restrict_files(read=sandbox_confine.readable_roots(installation_paths()),
                                            write=[str(exchange)], own_proc=True)
    report.update(sandbox_confine.deny_network_and_escapes())
    report.update(sandbox_confine.no_new_processes())
    report.update(sandbox_child.verify_confined())
    return report


def _run(args: argparse.Namespace, channel: _Channel, report: dict[str, str]) -> int:
    exchange = Path(args.exchange)
    scratch = exchange / "tmp"
    scratch.mkdir(exist_ok=True)
    os.environ.update(HOME=str(scratch), TMPDIR=str(scratch))
    tempfile.tempdir = None
    os.chdir(scratch)
    channel.send({"ready": True, "isolation": report})
    memory_mb = args.memory_mb or None
    try:
        message = train_job(exchange, channel, memory_mb, nproc=args.isolation != "landlock",
                            own_user_namespace=args.isolation == "bwrap")
    except MemoryError:
        message = {"error": f"MemoryError: the training needs more than the {memory_mb} MB of memory the trainer "
                            "allows on top of TensorFlow (TIERFLOW_SANDBOX_TRAINING_MEMORY_MB)", "permanent": True}
    channel.send(message)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown: it would wait for threads and atexit hooks the model code may have left.
    os._exit(0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tierflow.tiers.trainer",
                                     description="the sandboxed trainer of a training job (see tierflow.tiers.trainer)")
    parser.add_argument("--exchange", required=True, help="the exchange directory (as this process sees it)")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--isolation", choices=("bwrap", "landlock", "none"), required=True)
    parser.add_argument("--memory-mb", type=int, default=0, help="address space on top of TensorFlow's; 0: none")
    parser.add_argument("--drop-to", type=int, default=None, help="uid (and gid) to become when started as root")
    args = parser.parse_args(argv)
    channel = _Channel(args.channel_fd)
    sandbox_child.die_with_parent()
    report: dict[str, str] = {"level": args.isolation}
    try:
        if args.isolation == "bwrap":
            if args.drop_to is not None and os.getuid() == 0:
                sandbox_child.drop_to(args.drop_to)
            sandbox_child.verify_isolation(own_namespaces=False)
            sandbox_child.enter_namespaces()
            pid = os.fork()
            if pid != 0:
                return _keep(pid)
            sandbox_child.die_with_parent()
            sandbox_child.drop_capabilities()
            report.update(sandbox_child.verify_isolation(own_namespaces=True))
            report["processes"] = "a pid namespace of its own (its whole tree dies with it)"
            report["filesystem"] = "read-only system and installation; writes only to its exchange directory"
            sandbox_child.set_dumpable(False)
        elif args.isolation == "landlock":
            report.update(_confined_landlock(Path(args.exchange)))
        else:
            sandbox_child.set_dumpable(False)
    except (sandbox_child.IsolationError, sandbox_confine.ConfinementError, OSError) as exc:
        channel.send({"error": f"isolation check failed: {exc}", "permanent": False, "isolation": True})
        return 3
    return _run(args, channel, report)


def _keep(pid: int) -> int:
    """The first process under bwrap: it waits for the trainer (PID 1 of the namespaces below) and ends as it
    did. It holds no capability while it waits."""
    sandbox_child.drop_capabilities()
    return sandbox_child.end_alike(pid)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
