"""Load test of `python -m fmkeras.serve`: N requests from C concurrent clients on loopback.

    python tools/bench_serve.py saved_models/sst2 --requests 2000 --clients 16

Starts the server in this process on a free port, sends single-text
`:predict` requests (texts from --texts or a built-in list), and prints the
number of failures, requests/s and p50/p99 latency as JSON.
"""

import argparse
import json
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fmkeras.serve import create_server

TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés",
         "an utterly charming and hilarious film", "it 's slow -- very , very slow ."]  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=64)
    args = parser.parse_args()
    server, models = create_server(args.model_dir, port=0, max_batch=args.max_batch)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = (
        f"http://127.0.0.1:{server.server_address[1]}/v1/models/{Path(args.model_dir).name}:predict"
    )

    def one(i):
        body = json.dumps({"instances": [TEXTS[i % len(TEXTS)]]}).encode()
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=60) as r:
                ok = r.status == 200
        except OSError:
            ok = False
        return ok, time.perf_counter() - started

    one(0)  # warm up (traces the signature)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(one, range(args.requests)))
    seconds = time.perf_counter() - started
    server.shutdown()
    latencies = sorted(latency for _, latency in results)
    print(
        json.dumps(
            {
                "requests": args.requests,
                "clients": args.clients,
                "failed": sum(not ok for ok, _ in results),
                "requests_per_second": round(args.requests / seconds, 1),
                "p50_ms": round(1000 * statistics.median(latencies), 1),
                "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
                "versions": models.versions(),
            }
        )
    )


if __name__ == "__main__":
    main()
