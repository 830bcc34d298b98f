"""`python -m fmkeras.federated simulate|server|client ...`: federated
fine-tuning of a classify or tag recipe on Flower.

`simulate` runs the server and K clients in one machine with Flower's
simulation engine. `server` and `client` run the same apps as separate
processes with Flower's deployment engine: `server` starts a SuperLink and
submits the run to it (`flwr run`); each `client --partition I` starts a
SuperNode that trains partition I of the training file. The `federated.*`
keys of the recipe (and `--set`) choose clients, rounds, partition,
strategy, what travels and differential privacy.
"""

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fmkeras import cli
from fmkeras.errors import ConfigError, TrainingError

EXAMPLES = """examples:
  python -m fmkeras.federated simulate --recipe sst2_federated --set model.init=random \\
      --set model.size=tiny --set federated.rounds=2
  python -m fmkeras.federated simulate --recipe sst2_federated \\
      --set federated.partition=dirichlet --set federated.strategy=fedprox
  python -m fmkeras.federated server --recipe sst2_federated --set federated.clients=3 \\
      --out runs/fed --address 0.0.0.0:8000
  python -m fmkeras.federated client --partition 0 --server 10.0.0.5:8000"""
APP_DIR = Path(__file__).resolve().parent / "flower_app"  # the Flower App `flwr run` submits
FEDERATION = "fmkeras"  # the SuperLink connection's name in the server's Flower configuration


def build_parser():
    parser = cli.parser("federated", __doc__, EXAMPLES)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def recipe_arguments(sub):
        sub.add_argument("--recipe", required=True,
                         help="a classify or tag recipe: a path or a bundled recipe's name")
        sub.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="KEY=VALUE", help="override a recipe key (repeatable)")
        sub.add_argument("--data-dir", help="data directory (default: data.dir, then "
                         "$FMKERAS_DATA_DIR)")  # fmt: skip
        sub.add_argument("--out", help="run directory (default: runs/<recipe name>)")

    recipe_arguments(commands.add_parser(
        "simulate", help="server and K clients in this machine (Flower's simulation engine)"))
    server = commands.add_parser("server", help="a SuperLink plus this run's ServerApp")
    recipe_arguments(server)
    server.add_argument("--address", default="127.0.0.1:8000",
                        help="HOST:PORT the SuperLink listens on (0.0.0.0 for other machines)")
    client = commands.add_parser("client", help="a SuperNode that trains one partition")
    client.add_argument("--partition", type=int, required=True,
                        help="which partition of the training file this client owns (0..K-1)")
    client.add_argument("--server", default="127.0.0.1:8000", help="the server's HOST:PORT")
    client.add_argument("--workdir", help="where the client keeps its files "
                        "(default: runs/federated-client-<partition>)")  # fmt: skip
    client.add_argument("--data-dir", help="data directory (default: data.dir, then "
                        "$FMKERAS_DATA_DIR)")  # fmt: skip
    client.add_argument("--port", type=int,
                        help="the SuperNode's local API port (default: 9100 + partition)")
    return parser


def settings_from(args):
    """`Settings` of a `simulate` or `server` command, with the recipe, its
    task's settings and its data files checked (before Flower or TensorFlow loads)."""
    from fmkeras.federated.settings import Settings
    from fmkeras.tasks.spec import check_run
    from fmkeras.train import find_recipe

    recipe = find_recipe(args.recipe)
    out = Path(args.out or Path("runs") / recipe.stem).resolve()
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    settings = Settings(str(recipe.resolve()), tuple(args.overrides), str(out), data_dir)
    config = settings.config()
    check_run(config, data_dir, log=lambda _: None)
    return settings, config


def finished(settings, config):
    """Raises unless the server finished every round (Flower logs a failing
    ServerApp instead of raising)."""
    from fmkeras.federated.server import state_path

    metrics = Path(settings.out) / "metrics.json"
    state_file = state_path(settings.out)
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"round": 0}
    if state["round"] < config.federated.rounds or not metrics.is_file():
        raise TrainingError(f"the federated run stopped after round {state['round']} of "
                            f"{config.federated.rounds} (see the log above); the same command "
                            "resumes it")  # fmt: skip
    empty = [entry["round"] for entry in state["history"] if not entry["clients"]]
    if empty:
        raise TrainingError(f"no client update arrived in round(s) {empty} (see the client "
                            "errors above)")  # fmt: skip
    print(f"federated run finished: {metrics}", flush=True)


def simulate(args):
    settings, config = settings_from(args)
    from flwr.simulation import run_simulation

    from fmkeras.federated.app import make_client_app, make_server_app

    cores = os.cpu_count() or 1
    # One client at a time with every core: TensorFlow parallelises each step itself.
    backend = {"client_resources": {"num_cpus": cores, "num_gpus": 0.0},
               "init_args": {"num_cpus": cores, "num_gpus": 0}}  # fmt: skip
    run_simulation(server_app=make_server_app(settings), client_app=make_client_app(settings),
                   num_supernodes=config.federated.clients, backend_config=backend)  # fmt: skip
    shutil.rmtree(Path(settings.out) / "clients", ignore_errors=True)
    finished(settings, config)


def die_with_parent():
    """A child process's `preexec_fn`: SIGTERM when its parent dies (Linux), so a
    killed `server` leaves no SuperLink behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_for_port(host, port, process, log_file, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise TrainingError(f"the SuperLink exited with status {process.returncode}; see "
                                f"{log_file}")  # fmt: skip
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.3)
    raise TrainingError(f"the SuperLink did not listen on {host}:{port} within {seconds} s; see "
                        f"{log_file}")  # fmt: skip


def split_address(address):
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--address/--server expects HOST:PORT, got {address!r}")
    return host, int(port)


def toml_value(value):
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def server(args):
    settings, config = settings_from(args)
    host, port = split_address(args.address)
    home = Path(settings.out) / ".flower"
    home.mkdir(parents=True, exist_ok=True)
    connect = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
        f'address = "{connect}:{port}"\ninsecure = true\n', encoding="utf-8")  # fmt: skip
    run_config = home / "run_config.toml"
    run_config.write_text("".join(f"{key} = {toml_value(value)}\n"
                                  for key, value in settings.run_config().items()),
                          encoding="utf-8")  # fmt: skip
    env = {**os.environ, "FLWR_HOME": str(home)}
    log_file = home / "superlink.log"
    bin_dir = Path(sys.executable).parent
    with open(log_file, "ab") as output:
        link = subprocess.Popen(
            # A database in the run directory: a restarted server knows the
            # SuperNodes that were connected (they keep their ids and reconnect).
            [str(bin_dir / "flower-superlink"), "--insecure", "--host", host, "--port", str(port),
             "--database", str(home / "superlink.db")],
            stdout=output, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent,
        )  # fmt: skip
    try:
        wait_for_port(connect, port, link, log_file)
        print(f"SuperLink listening on {host}:{port} (log {log_file}); clients: python -m "
              f"fmkeras.federated client --partition I --server {connect}:{port}", flush=True)
        subprocess.run([str(bin_dir / "flwr"), "run", str(APP_DIR), FEDERATION, "--stream",
                        "--run-config", str(run_config)], env=env, check=False)  # fmt: skip
    finally:
        link.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            link.wait(timeout=20)
        if link.poll() is None:
            link.kill()
    finished(settings, config)


def client(args):
    if args.partition < 0:
        raise ConfigError(f"--partition must be 0 or more, got {args.partition}")
    split_address(args.server)
    workdir = Path(args.workdir or Path("runs") / f"federated-client-{args.partition}").resolve()
    node = {"partition-id": args.partition, "workdir": str(workdir)}
    if args.data_dir:
        node["data-dir"] = str(Path(args.data_dir).resolve())
    node_config = " ".join(f"{key}={toml_value(value)}" for key, value in node.items())
    port = args.port or 9100 + args.partition
    command = [str(Path(sys.executable).parent / "flower-supernode"), "--insecure", "--superlink",
               args.server, "--node-config", node_config, "--port", str(port)]  # fmt: skip
    print(f"client {args.partition}: SuperNode connecting to {args.server}", flush=True)
    os.execv(command[0], command)  # the SuperNode is this process: killing it kills the client


@cli.command
def main(argv):
    args = build_parser().parse_args(argv)
    {"simulate": simulate, "server": server, "client": client}[args.command](args)
    return 0
