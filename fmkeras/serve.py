"""`python -m fmkeras.serve saved_models/NAME`: a local stand-in for TF Serving's REST API.

For demos and tests on machines without TF Serving (production should run
TF Serving itself on the same export). It speaks the subset users call:

    GET  /v1/models/NAME                       version status
    POST /v1/models/NAME[/versions/N]:predict  {"instances": [...]} or {"inputs": ...}

serving the `serving_default` signature of the newest version (a newly
exported version is picked up without a restart). Concurrent requests are
batched together (up to `--max-batch` rows, waiting at most `--batch-wait-ms`).
Bad requests get TF Serving-style `{"error": "..."}` answers with status 400
(404 for unknown models/versions) and the server keeps serving.
"""

import json
import queue
import sys
import threading
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from fmkeras import cli


class BadRequest(Exception):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class ModelVersions:
    """The versions of one exported model; loads the newest on demand."""

    def __init__(self, base):
        self.base = Path(base)
        self.name = self.base.name
        self._loaded = {}
        self._lock = threading.Lock()

    def versions(self):
        return sorted(int(p.name) for p in self.base.iterdir() if p.name.isdigit() and
                      (p / "saved_model.pb").is_file())  # fmt: skip

    def signature(self, version=None):
        available = self.versions()
        if not available:
            raise BadRequest(f"Servable not found for request: Latest({self.name})", 404)
        version = available[-1] if version is None else version
        if version not in available:
            raise BadRequest(
                f"Servable not found for request: Specific({self.name}, {version})", 404
            )
        with self._lock:
            if version not in self._loaded:
                import tensorflow as tf

                loaded = tf.saved_model.load(str(self.base / str(version)))
                self._loaded[version] = (loaded, loaded.signatures["serving_default"])
        return version, self._loaded[version][1]


class Batcher:
    """Runs requests for the same version together: one signature call per batch."""

    def __init__(self, models, max_batch, wait_seconds):
        self.models, self.max_batch, self.wait = models, max_batch, wait_seconds
        self.requests = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, version, texts):
        future = Future()
        self.requests.put((version, texts, future))
        return future.result()

    def _loop(self):
        while True:
            pending = [self.requests.get()]
            rows = len(pending[0][1])
            while rows < self.max_batch:
                try:
                    item = self.requests.get(timeout=self.wait)
                except queue.Empty:
                    break
                pending.append(item)
                rows += len(item[1])
            for version in {item[0] for item in pending}:
                group = [item for item in pending if item[0] == version]
                self._run(version, group)

    def _run(self, version, group):
        try:
            number, signature = self.models.signature(version)
            texts = [text for _, chunk, _ in group for text in chunk]
            outputs = {k: v.numpy() for k, v in signature(texts=np.array(texts, object)).items()}
            start = 0
            for _, chunk, future in group:
                part = {k: v[start : start + len(chunk)] for k, v in outputs.items()}
                future.set_result((number, part))
                start += len(chunk)
        except Exception as error:  # noqa: BLE001 - every waiting request must be answered
            for _, _, future in group:
                future.set_exception(error)


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value] if value.ndim else _jsonable(value.item())
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def parse_request(body, max_batch):
    """Texts from a TF Serving predict body, and whether it used the row form."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"JSON Parse error: {error}") from None
    if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
        raise BadRequest("Missing 'inputs' or 'instances' key (exactly one is required)")
    rows = "instances" in request
    values = request["instances"] if rows else request["inputs"]
    if isinstance(values, dict):  # {"inputs": {"texts": [...]}}
        values = values.get("texts")
    if isinstance(values, list):  # rows may be {"texts": "..."} or plain strings
        values = [v.get("texts") if isinstance(v, dict) else v for v in values]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BadRequest("expected a list of strings for input 'texts' (type DT_STRING)")
    if not values:
        raise BadRequest("empty batch")
    if len(values) > max_batch:
        raise BadRequest(f"batch of {len(values)} rows exceeds the maximum of {max_batch}")
    return values, rows


def make_handler(models, batcher, max_batch, max_body):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet; TF Serving logs no access lines either
            pass

        def _reply(self, status, payload):
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self):
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) < 3 or parts[:2] != ["v1", "models"]:
                raise BadRequest(f"Malformed request: {self.command} {self.path}", 404)
            name, verb = parts[2], None
            if ":" in parts[-1]:
                parts[-1], verb = parts[-1].split(":", 1)
            if parts[2] != models.name:
                raise BadRequest(f"Servable not found for request: Latest({parts[2]})", 404)
            version = None
            if len(parts) == 5 and parts[3] == "versions" and parts[4].isdigit():
                version = int(parts[4])
            elif len(parts) != 3:
                raise BadRequest(f"Malformed request: {self.command} {self.path}", 404)
            return name, version, verb

        def do_GET(self):
            try:
                _, version, _ = self._route()
                versions = [version] if version is not None else models.versions()
                states = [{"version": str(v), "state": "AVAILABLE",
                           "status": {"error_code": "OK", "error_message": ""}}
                          for v in versions if v in models.versions()]  # fmt: skip
                if not states:
                    raise BadRequest(f"Could not find any versions of model {models.name}", 404)
                self._reply(200, {"model_version_status": states})
            except BadRequest as error:
                self._reply(error.status, {"error": str(error)})

        def do_POST(self):
            try:
                _, version, verb = self._route()
                if verb != "predict":
                    raise BadRequest(
                        f"Malformed request: only :predict is served, not :{verb}", 404
                    )
                length = int(self.headers.get("Content-Length") or 0)
                if length > max_body:
                    self.rfile.read(length)
                    raise BadRequest(f"request body of {length} bytes exceeds {max_body}")
                texts, rows = parse_request(self.rfile.read(length), max_batch)
                _, outputs = batcher.submit(version, texts)
                if rows:
                    payload = {"predictions": [
                        {k: _jsonable(v[i]) for k, v in outputs.items()} for i in range(len(texts))
                    ]}  # fmt: skip
                else:
                    payload = {"outputs": {k: _jsonable(v) for k, v in outputs.items()}}
                self._reply(200, payload)
            except BadRequest as error:
                self._reply(error.status, {"error": str(error)})
            except Exception as error:  # noqa: BLE001 - answer, log, keep serving
                self._reply(500, {"error": f"{type(error).__name__}: {error}"})

    return Handler


def create_server(model_dir, port=8501, max_batch=64, batch_wait_ms=5, max_body=1 << 20):
    models = ModelVersions(model_dir)
    models.signature()  # load (and fail on a broken export) before accepting requests
    batcher = Batcher(models, max_batch, batch_wait_ms / 1000)
    handler = make_handler(models, batcher, max_batch, max_body)
    return ThreadingHTTPServer(("127.0.0.1", port), handler), models


EXAMPLES = """examples:
  python -m fmkeras.serve saved_models/sst2
  curl -d '{"instances": ["a charming film"]}' localhost:8501/v1/models/sst2:predict"""


def build_parser():
    parser = cli.parser("serve", __doc__, EXAMPLES)
    parser.add_argument("model_dir", help="saved_models/NAME (holding numbered versions)")
    parser.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1")
    parser.add_argument("--max-batch", type=int, default=64,
                        help="rows run together, and the largest request accepted")  # fmt: skip
    parser.add_argument("--batch-wait-ms", type=float, default=5,
                        help="how long a request waits for others to batch with")  # fmt: skip
    return parser


@cli.command
def main(argv):
    args = build_parser().parse_args(argv)
    server, models = create_server(args.model_dir, args.port, args.max_batch, args.batch_wait_ms)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/models/{models.name}"
    print(f"serving {models.name} versions {models.versions()} at {url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
