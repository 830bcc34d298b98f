"""`python -m fmkeras.serve saved_models/NAME`: a local stand-in for TF Serving's REST API.

For demos and tests on machines without TF Serving (production should run
TF Serving itself on the same export). It speaks the subset users call:

    GET  /v1/models/NAME                       version status
    POST /v1/models/NAME[/versions/N]:predict  {"instances": [...]} or {"inputs": ...}

serving the `serving_default` signature of the newest version (a newly
exported version is picked up without a restart). Concurrent requests are
batched together (up to `--max-batch` rows, waiting at most `--batch-wait-ms`).
Bad requests get TF Serving-style `{"error": "..."}` answers with a 4xx
status (400 bad body, 404 unknown model or version, 408 slow client, 411/413
missing or oversized body) and the server keeps serving. Connections stay
open between requests (HTTP/1.1 keep-alive) until `--timeout` seconds idle;
more than `--max-connections` at once get 503 at once; SIGTERM stops
accepting, answers the requests in flight, then exits 0.
"""

import json
import queue
import signal
import sys
import threading
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from fmkeras import cli
from fmkeras.errors import ConfigError


class BadRequest(Exception):
    """A request answered with `status` and `{"error": message}`; `close` ends the
    connection (when the body could not be read, the stream cannot be reused)."""

    def __init__(self, message, status=400, close=False):
        super().__init__(message)
        self.status = status
        self.close = close


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


def rows_of(columns):
    return len(next(iter(columns.values())))  # the first input is a list of strings


def settings_of(columns):
    """The scalar settings of a request (requests batch together only when they agree)."""
    return tuple((name, value.item()) for name, value in columns.items()
                 if isinstance(value, np.ndarray))  # fmt: skip


class Batcher:
    """Runs requests for the same version together: one signature call per batch."""

    def __init__(self, models, max_batch, wait_seconds):
        self.models, self.max_batch, self.wait = models, max_batch, wait_seconds
        self.requests = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, version, columns):
        """Outputs for `columns` (`{input name: [strings]}`) from `version`."""
        future = Future()
        self.requests.put((version, columns, future))
        return future.result()

    def _loop(self):
        while True:
            pending = [self.requests.get()]
            rows = rows_of(pending[0][1])
            while rows < self.max_batch:
                try:
                    item = self.requests.get(timeout=self.wait)
                except queue.Empty:
                    break
                pending.append(item)
                rows += rows_of(item[1])
            for version, settings in {(item[0], settings_of(item[1])) for item in pending}:
                group = [item for item in pending
                         if item[0] == version and settings_of(item[1]) == settings]  # fmt: skip
                self._run(version, group)

    def _run(self, version, group):
        try:
            number, signature = self.models.signature(version)
            inputs = {name: value if isinstance(value, np.ndarray)  # a setting the group shares
                      else np.array([text for _, columns, _ in group for text in columns[name]],
                                    object) for name, value in group[0][1].items()}  # fmt: skip
            outputs = {k: v.numpy() for k, v in signature(**inputs).items()}
            start = 0
            for _, columns, future in group:
                size = rows_of(columns)
                part = {k: v[start : start + size] for k, v in outputs.items()}
                future.set_result((number, part))
                start += size
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


def parse_request(body, max_batch, names=("texts",), settings=None):
    """The string inputs `names` of a TF Serving predict body as `{name:
    [values]}` (all of one length), and whether it used the row form.
    `settings` (`{name: numpy dtype}`) are scalar inputs, such as a causal
    LM's `temperature`: they come in the columnar form only (as in TF
    Serving) and are added to the columns as numpy scalars."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"JSON Parse error: {error}") from None
    except RecursionError:
        raise BadRequest("JSON Parse error: nested too deeply") from None
    if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
        raise BadRequest("Missing 'inputs' or 'instances' key (exactly one is required)")
    rows = "instances" in request
    values = request["instances"] if rows else request["inputs"]
    if isinstance(values, dict):  # {"inputs": {"texts": [...], ...}}
        columns = {name: values.get(name) for name in names}
    elif isinstance(values, list) and rows:  # rows: {"texts": "...", ...} or plain strings
        columns = {name: [v.get(name) if isinstance(v, dict) else v for v in values]
                   for name in names}  # fmt: skip
        if len(names) > 1 and not all(isinstance(v, dict) for v in values):
            raise BadRequest(f"each instance needs the inputs {', '.join(names)}")
    else:  # {"inputs": [...]}: the only input
        columns = {name: values for name in names[:1]} if len(names) == 1 else {}
    for name in names:
        column = columns.get(name)
        if not isinstance(column, list) or not all(isinstance(v, str) for v in column):
            raise BadRequest(f"expected a list of strings for input '{name}' (type DT_STRING)")
    lengths = {len(column) for column in columns.values()}
    if len(lengths) > 1:
        raise BadRequest(f"inputs {', '.join(names)} have different batch sizes {sorted(lengths)}")
    size = lengths.pop()
    if not size:
        raise BadRequest("empty batch")
    if size > max_batch:
        raise BadRequest(f"batch of {size} rows exceeds the maximum of {max_batch}")
    for name, column in columns.items():
        for index, value in enumerate(column):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # e.g. a lone surrogate written as "\\ud800"
                raise BadRequest(f"{name} {index} is not valid Unicode") from None
    given = values if isinstance(values, dict) and not rows else {}
    missing = sorted(name for name in settings or {} if given.get(name) is None)
    if missing:
        example = ", ".join(f'"{name}": ...' for name in missing)
        form = f'{{"inputs": {{"{names[0]}": [...], {example}}}}}'
        raise BadRequest(f"missing the scalar settings {', '.join(missing)}: send them in the "
                         f"columnar form {form}")
    for name, dtype in (settings or {}).items():
        value = given[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                np.issubdtype(dtype, np.integer) and value != int(value)):  # fmt: skip
            raise BadRequest(f"expected a {np.dtype(dtype).name} for input '{name}', got {value!r}")
        columns[name] = np.asarray(value, dtype)
    return columns, rows


def input_names(signature):
    """The string inputs of a `serving_default` signature, `texts` first."""
    specs = signature.structured_input_signature[1]
    strings = [name for name, spec in specs.items() if spec.dtype.name == "string"]
    return tuple(sorted(strings, key=lambda n: n != "texts"))


def setting_inputs(signature):
    """The scalar inputs of a signature (a causal LM's sampling settings):
    `{name: numpy dtype}`."""
    specs = signature.structured_input_signature[1]
    return {name: spec.dtype.as_numpy_dtype for name, spec in specs.items()
            if spec.shape.rank == 0}  # fmt: skip


class Server(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` with a deep listen backlog, a bound on open
    connections (more get an immediate 503) and a count of requests in flight
    (so SIGTERM can drain them).

    Args:
        address: `(host, port)`; port 0 picks a free one.
        handler: the request handler class.
        max_connections: connections served at once (each holds a thread).
        backlog: the listen backlog. socketserver's default of 5 overflowed under
            bursts of new connections, and TCP retried the dropped SYNs 1 s and
            3 s later: the 1-2 s p99 tail that `tools/bench_serve.py --connection
            new` measured (README, "Reliability").
    """

    daemon_threads = True

    def __init__(self, address, handler, max_connections=256, backlog=1024):
        self.request_queue_size = backlog
        super().__init__(address, handler)
        self.max_connections = max_connections
        self.connections = 0
        self.in_flight = 0
        self.draining = False
        self._idle = threading.Condition()

    def process_request(self, request, client_address):
        with self._idle:
            admitted = self.connections < self.max_connections and not self.draining
            self.connections += admitted
        if admitted:
            super().process_request(request, client_address)
            return
        reason = "shutting down" if self.draining else \
            f"overloaded ({self.max_connections} connections open)"  # fmt: skip
        body = json.dumps({"error": f"server {reason}; retry later"}).encode("utf-8")
        try:
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
                            b"\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: %d"
                            b"\r\n\r\n%s" % (len(body), body))  # fmt: skip
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._idle:
                self.connections -= 1

    def request_started(self):
        with self._idle:
            self.in_flight += 1

    def request_finished(self):
        with self._idle:
            self.in_flight -= 1
            self._idle.notify_all()

    def drain(self, timeout):
        """Stops admitting connections and waits (at most `timeout` seconds) until
        no request is in flight; returns how many were still running."""
        with self._idle:
            self.draining = True
            self._idle.wait_for(lambda: self.in_flight == 0, timeout)
            return self.in_flight


def make_handler(models, batcher, max_batch, max_body, timeout):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def log_message(self, *args):  # quiet; TF Serving logs no access lines either
            pass

        def _reply(self, status, payload, close=False):
            data = json.dumps(payload).encode("utf-8") if self.command != "HEAD" else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close or self.server.draining:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if data:
                self.wfile.write(data)

        def _body(self):
            """The request body; refuses bodies it cannot delimit or that are too big
            (those answers close the connection: the unread bytes cannot be skipped)."""
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                raise BadRequest("chunked bodies are not accepted; send Content-Length", 411, True)
            length = self.headers.get("Content-Length")
            if length is None:
                raise BadRequest("a :predict request needs a Content-Length header", 411, True)
            if not length.strip().isdigit():
                raise BadRequest(f"bad Content-Length {length!r}", 400, True)
            if int(length) > max_body:
                raise BadRequest(f"request body of {int(length)} bytes exceeds {max_body}", 413,
                                 True)  # fmt: skip
            return self.rfile.read(int(length))

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
            self.server.request_started()
            try:
                self._predict()
            finally:
                self.server.request_finished()

        def _not_allowed(self):
            self._reply(405, {"error": f"{self.command} is not served; use GET or POST"}, True)

        do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

        def _predict(self):
            try:
                body = self._body()  # read first: an unread body would corrupt keep-alive
                _, version, verb = self._route()
                if verb != "predict":
                    raise BadRequest(
                        f"Malformed request: only :predict is served, not :{verb}", 404
                    )
                signature = models.signature(version)[1]
                columns, rows = parse_request(body, max_batch, input_names(signature),
                                              setting_inputs(signature))  # fmt: skip
                _, outputs = batcher.submit(version, columns)
                if rows:
                    payload = {"predictions": [
                        {k: _jsonable(v[i]) for k, v in outputs.items()}
                        for i in range(rows_of(columns))
                    ]}  # fmt: skip
                else:
                    payload = {"outputs": {k: _jsonable(v) for k, v in outputs.items()}}
                self._reply(200, payload)
            except BadRequest as error:
                self._reply(error.status, {"error": str(error)}, error.close)
            except TimeoutError:  # the client stopped sending its body
                self._reply(408, {"error": f"no data from the client for {timeout:g} s"}, True)
            except Exception as error:  # noqa: BLE001 - answer, log, keep serving
                self._reply(500, {"error": f"{type(error).__name__}: {error}"})

    # Socket timeout: a client that sends nothing for this long (idle between
    # requests, or stalled in the middle of one) loses its connection and thread.
    Handler.timeout = timeout
    return Handler


def create_server(model_dir, port=8501, max_batch=64, batch_wait_ms=5, max_body=1 << 20, *,
                  host="127.0.0.1", timeout=30.0, max_connections=256, backlog=1024):  # fmt: skip
    """A `Server` for the exported model `model_dir` (loaded here, so a broken
    export fails before any request) and its `ModelVersions`."""
    if not Path(model_dir).is_dir():
        raise ConfigError(f"{model_dir} is not a directory of exported versions "
                          "(python -m fmkeras.export RUN --name NAME writes one)")  # fmt: skip
    models = ModelVersions(model_dir)
    try:
        models.signature()  # load (and fail on a broken export) before accepting requests
    except BadRequest:
        raise ConfigError(f"{model_dir} holds no exported version (no N/saved_model.pb)") from None
    batcher = Batcher(models, max_batch, batch_wait_ms / 1000)
    handler = make_handler(models, batcher, max_batch, max_body, timeout)
    return Server((host, port), handler, max_connections, backlog), models


EXAMPLES = """examples:
  python -m fmkeras.serve saved_models/sst2
  curl -d '{"instances": ["a charming film"]}' localhost:8501/v1/models/sst2:predict"""


def build_parser():
    parser = cli.parser("serve", __doc__, EXAMPLES)
    parser.add_argument("model_dir", help="saved_models/NAME (holding numbered versions)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface)")  # fmt: skip
    parser.add_argument("--port", type=int, default=8501, help="port (0: a free one)")
    parser.add_argument("--max-batch", type=int, default=64,
                        help="rows run together, and the largest request accepted")  # fmt: skip
    parser.add_argument("--batch-wait-ms", type=float, default=5,
                        help="how long a request waits for others to batch with")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=30,
                        help="seconds a connection may stay silent (idle or mid-request) "
                        "before it is closed")  # fmt: skip
    parser.add_argument("--max-connections", type=int, default=256,
                        help="connections served at once; more get 503")  # fmt: skip
    parser.add_argument("--backlog", type=int, default=1024,
                        help="connections the kernel queues before they are accepted")  # fmt: skip
    return parser


@cli.command
def main(argv):
    args = build_parser().parse_args(argv)
    server, models = create_server(args.model_dir, args.port, args.max_batch, args.batch_wait_ms,
                                   host=args.host, timeout=args.timeout,
                                   max_connections=args.max_connections,
                                   backlog=args.backlog)  # fmt: skip
    host, port = server.server_address[:2]
    print(f"serving {models.name} versions {models.versions()} at "
          f"http://{host}:{port}/v1/models/{models.name}", flush=True)  # fmt: skip

    def stop(signum, frame):  # serve_forever runs in this thread: shut it down from another
        server.draining = True
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    unanswered = server.drain(args.timeout)
    server.server_close()
    if unanswered:
        print(f"stopped: {unanswered} request(s) still running after {args.timeout:g} s",
              flush=True)  # fmt: skip
    else:
        print("stopped: every request in flight was answered", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
