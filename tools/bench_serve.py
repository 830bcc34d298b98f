"""Load and soak test of `python -m fmkeras.serve` from concurrent clients on loopback.

    python tools/bench_serve.py saved_models/sst2 --requests 2000 --clients 16
    python tools/bench_serve.py saved_models/sst2 --duration 600 --clients 64   # soak
    python tools/bench_serve.py saved_models/sst2 --connection new --server-args="--backlog 5"

Starts the server as its own process on a free port (so the clients'
Python does not share its interpreter), sends single-text `:predict`
requests from `--clients` threads, each on one keep-alive connection (or a
new connection per request with `--connection new`), and prints JSON:
failures by kind, requests/s, p50/p99/p99.9/max latency, the server's RSS
sampled over the run (and its change from the first to the last minute),
and the kernel's listen-queue overflow count during the run.
"""

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés",
         "an utterly charming and hilarious film", "it 's slow -- very , very slow ."]  # fmt: skip


def rss_mb(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def listen_overflows():
    """TcpExt ListenOverflows from /proc/net/netstat (None where unreadable)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(table.get("ListenOverflows", 0))
    return None


def percentile(ordered, fraction):
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def start_server(model_dir, server_args):
    process = subprocess.Popen(
        [sys.executable, "-m", "fmkeras.serve", str(model_dir), "--port", "0", *server_args],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = process.stdout.readline()
    match = re.search(r"http://([^:]+):(\d+)(/\S+)", line)
    if not match:
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, match.group(1), int(match.group(2)), match.group(3) + ":predict"


class Client(threading.Thread):
    """Sends requests until `stop` is set (or `budget` runs out), recording latencies."""

    def __init__(self, host, port, path, keep_alive, stop, budget):
        super().__init__(daemon=True)
        self.address, self.path, self.keep_alive = (host, port), path, keep_alive
        self.stop, self.budget = stop, budget
        self.latencies, self.failures = [], Counter()

    def run(self):
        connection, index = None, 0
        while not self.stop.is_set() and self.budget.take():
            body = json.dumps({"instances": [TEXTS[index % len(TEXTS)]]})
            index += 1
            started = time.perf_counter()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(*self.address, timeout=60)
                connection.request("POST", self.path, body,
                                   {"Content-Type": "application/json"})  # fmt: skip
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    self.failures[f"HTTP {response.status}"] += 1
                if not self.keep_alive or response.getheader("Connection") == "close":
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as error:
                self.failures[type(error).__name__] += 1
                connection.close()
                connection = None
                continue
            self.latencies.append(time.perf_counter() - started)


class Budget:
    """A shared count of requests left (None: unlimited)."""

    def __init__(self, total):
        self.left, self.lock = total, threading.Lock()

    def take(self):
        if self.left is None:
            return True
        with self.lock:
            self.left -= 1
            return self.left >= 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--requests", type=int, default=2000, help="stop after this many")
    parser.add_argument("--duration", type=float, help="soak: run this many seconds instead")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--connection", choices=("keep-alive", "new"), default="keep-alive")
    parser.add_argument("--sample-every", type=float, default=10, help="seconds between RSS reads")
    parser.add_argument("--server-args", default="", help="extra flags for fmkeras.serve")
    args = parser.parse_args()
    process, host, port, path = start_server(args.model_dir, args.server_args.split())
    try:
        warm = Client(host, port, path, True, threading.Event(), Budget(3))
        warm.run()  # traces the signature
        stop, budget = threading.Event(), Budget(None if args.duration else args.requests)
        clients = [Client(host, port, path, args.connection == "keep-alive", stop, budget)
                   for _ in range(args.clients)]  # fmt: skip
        overflows, started = listen_overflows(), time.perf_counter()
        samples = [(0.0, rss_mb(process.pid))]
        for client in clients:
            client.start()
        while any(client.is_alive() for client in clients):
            time.sleep(min(1.0, args.sample_every))
            elapsed = time.perf_counter() - started
            if elapsed - samples[-1][0] >= args.sample_every:
                samples.append((elapsed, rss_mb(process.pid)))
            if args.duration and elapsed >= args.duration:
                stop.set()
        for client in clients:
            client.join()
        seconds = time.perf_counter() - started
        samples.append((seconds, rss_mb(process.pid)))
        after = listen_overflows()
    finally:
        process.terminate()
        process.wait(timeout=60)
    latencies = sorted(latency for client in clients for latency in client.latencies)
    failures = sum((client.failures for client in clients), Counter())
    # RSS change: the last minute's mean against the first minute's (after warm-up).
    first = [mb for t, mb in samples if t <= 60] or [samples[0][1]]
    last = [mb for t, mb in samples if t >= seconds - 60] or [samples[-1][1]]
    report = {
        "clients": args.clients,
        "connection": args.connection,
        "seconds": round(seconds, 1),
        "requests": len(latencies) + sum(failures.values()),
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "requests_per_second": round(len(latencies) / seconds, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
        "p99_9_ms": round(1000 * percentile(latencies, 0.999), 1),
        "max_ms": round(1000 * latencies[-1], 1),
        "rss_mb": [[round(t), round(mb, 1)] for t, mb in samples],
        "rss_change": round(statistics.mean(last) / statistics.mean(first) - 1, 4),
        "listen_overflows": None if overflows is None else after - overflows,
        "server_args": args.server_args,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
