"""`python -m fmkeras.launch --workers N -- python -m fmkeras.train ...`: a local
multi-worker cluster.

Starts N copies of the command, each with a `TF_CONFIG` that names every
worker on a free loopback port and its own index (worker 0 is the chief),
and with `--set distribute.strategy=multi_worker` appended to `fmkeras.train`
commands (plus `distribute.cpu_devices=K` for `--devices-per-worker K`).
Their output is streamed line by line with a `[worker i]` prefix. If one
worker fails, the others are stopped — SIGTERM, then SIGKILL after a grace
period, because TensorFlow swallows SIGTERM in multi-worker mode — and the
launcher exits with the failed worker's code. Running the same command again
resumes from the workers' newest common backup.

On real hosts, start the command on each host yourself with a `TF_CONFIG`
such as `{"cluster": {"worker": ["host0:12345", "host1:12345"]},
"task": {"type": "worker", "index": 1}}` (same cluster everywhere, own index).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from fmkeras import cli

GRACE_SECONDS = 10


def free_ports(count):
    """`count` loopback ports that were free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def worker_command(command, devices_per_worker):
    """The command with the multi-worker settings appended (fmkeras.train only)."""
    if "fmkeras.train" not in command:
        return list(command)
    extra = ["--set", "distribute.strategy=multi_worker"]
    if devices_per_worker:
        extra += ["--set", f"distribute.cpu_devices={devices_per_worker}"]
    return [*command, *extra]


def _stream(index, process, output):
    for line in process.stdout:
        output.write(f"[worker {index}] {line}")
        output.flush()


def stop(processes, grace=GRACE_SECONDS):
    """SIGTERM to every live worker's process group, SIGKILL after `grace` seconds."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.time() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def launch(command, workers, devices_per_worker=None, output=sys.stdout, grace=GRACE_SECONDS):
    """Runs `command` as `workers` local workers; returns the exit code (0 if all succeed)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(workers)]}
    command = worker_command(command, devices_per_worker)
    processes, streams = [], []
    for index in range(workers):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: stopping reaches its children
        )  # fmt: skip
        output.write(
            f"[launch] worker {index}: pid {process.pid}, TF_CONFIG {json.dumps(tf_config)}\n"
        )
        processes.append(process)
        streams.append(threading.Thread(target=_stream, args=(index, process, output), daemon=True))
        streams[-1].start()
    output.flush()
    try:
        while True:
            codes = [process.poll() for process in processes]
            failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                index = failed[0]
                output.write(f"[launch] worker {index} exited with code {codes[index]}; "
                             "stopping the others\n")  # fmt: skip
                stop(processes, grace)
                code = codes[index]
                return code if code > 0 else 128 - code  # killed by signal -s: 128 + s
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        output.write("[launch] interrupted; stopping the workers\n")
        stop(processes, grace)
        return 130
    finally:
        for thread in streams:
            thread.join(timeout=5)
        output.flush()


EXAMPLES = """examples:
  python -m fmkeras.launch --workers 2 -- python -m fmkeras.train --recipe pretrain_gutenberg
  python -m fmkeras.launch --workers 2 --devices-per-worker 2 -- python -m fmkeras.train ..."""


def build_parser():
    parser = cli.parser("launch", __doc__, EXAMPLES)
    parser.usage = "python -m fmkeras.launch [--workers N] [--devices-per-worker K] -- COMMAND ..."
    parser.add_argument("--workers", type=int, default=2, help="local worker processes")
    parser.add_argument("--devices-per-worker", type=int,
                        help="logical CPU devices per worker (replicas)")  # fmt: skip
    parser.add_argument("--grace", type=float, default=GRACE_SECONDS,
                        help="seconds from SIGTERM to SIGKILL when stopping workers")  # fmt: skip
    return parser


@cli.command
def main(argv):
    split = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command or args.workers < 1:
        parser.error("give --workers >= 1 and a command after --")
    return launch(command, args.workers, args.devices_per_worker, grace=args.grace)


if __name__ == "__main__":
    sys.exit(main())
