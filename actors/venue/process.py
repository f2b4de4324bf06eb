"""The venue simulator in its own OS process, and the ``serve`` command line.

    with VenueProcess.start("deribit-sim", keys={"acct-a": "secret-a-123"}) as venue:
        venue.ws_url, venue.http_url, venue.pid     # ws://127.0.0.1:PORT/ws/api/v2, http://...
    # stopped: SIGTERM, then SIGKILL after stop_timeout_s

``VenueProcess.start`` runs ``python -m actors.venue.process serve ...`` and waits for the
ready line (``VENUE_READY ws=<url> http=<url>``) it prints once listening; keys travel in a
0600 temporary file, never on the command line. ``main(argv)`` is the command:

    serve --name NAME [--port PORT] [--data FILE] [--seed S] [--keys FILE] [--synthetic]
          [--speedup X] [--options] [--latency-s S] [--min-heartbeat-s S]
          [--cod-cancels-account-orders] [--max-queue-messages N] [--l1-load-rate N]
          [--replay-from ISO_TIME]
          [--exit-with-parent]

``--keys`` is a JSON object ``{client_id: client_secret}``; without it one key is generated and
written to a 0600 file whose path is printed (the secret itself is never printed). The server
runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from actors.venue.l1_feed import L1_PATH
from actors.venue.server import ServerConfig, VenueServer

READY_PREFIX = "VENUE_READY "
REPO_ROOT = Path(__file__).resolve().parents[2]


class VenueProcessError(RuntimeError):
    """The venue process did not come up (its last output lines are in the message)."""


@dataclass
class VenueProcess:
    """A running venue server process (see the module doc)."""

    name: str
    ws_url: str
    http_url: str
    keys: dict[str, str]
    popen: subprocess.Popen[str]
    output: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=200))
    stop_timeout_s: float = 10.0
    _keys_file: Path | None = None
    _drain: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def port(self) -> int:
        return int(self.http_url.rsplit(":", 1)[1])

    @property
    def l1_url(self) -> str:
        """The binary top-of-book feed (``actors.venue.l1_feed``)."""
        return self.http_url.replace("http://", "ws://", 1) + L1_PATH

    @classmethod
    def start(cls, name: str, port: int = 0, data: Path | str | None = None, seed: int = 0,
              keys: Mapping[str, str] | None = None, speedup: float = 60.0,
              synthetic: bool = False, *, options: bool = False, latency_s: float = 0.0,
              min_heartbeat_s: float | None = None, cod_cancels_account_orders: bool = False,
              max_queue_messages: int | None = None, l1_load_rate_per_s: float = 0.0,
              replay_from: str | None = None,
              start_timeout_s: float = 30.0, stop_timeout_s: float = 10.0,
              python: str | None = None, log_path: Path | None = None) -> VenueProcess:
        """Start the server process and wait until it listens. Without ``keys`` one key is
        generated (``.keys`` has it). With ``log_path`` the process is detached: its own
        session, output to that file, and it outlives this process (``bastion up``)."""
        keys = dict(keys) if keys is not None else {f"sim-{name}": secrets.token_hex(16)}
        ServerConfig(name=name, keys=keys, port=port, speedup=speedup)  # fail here, not there
        fd, keys_path = tempfile.mkstemp(prefix="bastion-venue-keys-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(keys, f)
        argv = [python or sys.executable, "-u", "-m", "actors.venue.process", "serve",
                "--name", name, "--port", str(port), "--seed", str(seed), "--keys", keys_path,
                "--speedup", repr(float(speedup)), "--latency-s", repr(float(latency_s))]
        if log_path is None:
            argv.append("--exit-with-parent")
        if data is not None:
            argv += ["--data", str(data)]
        if synthetic:
            argv.append("--synthetic")
        if options:
            argv.append("--options")
        if min_heartbeat_s is not None:
            argv += ["--min-heartbeat-s", repr(float(min_heartbeat_s))]
        if cod_cancels_account_orders:
            argv.append("--cod-cancels-account-orders")
        if max_queue_messages is not None:
            argv += ["--max-queue-messages", str(max_queue_messages)]
        if replay_from is not None:
            argv += ["--replay-from", replay_from]
        if l1_load_rate_per_s:
            argv += ["--l1-load-rate", repr(float(l1_load_rate_per_s))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        if log_path is None:
            popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, env=env,
                                     cwd=REPO_ROOT)
        else:
            with open(log_path, "w") as log:
                popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, text=True, env=env,
                                         cwd=REPO_ROOT, start_new_session=True)
        proc = cls(name, "", "", keys, popen, stop_timeout_s=stop_timeout_s,
                   _keys_file=Path(keys_path))
        try:
            if log_path is None:
                proc._wait_ready(start_timeout_s)
            else:
                proc._wait_ready_in_file(Path(log_path), start_timeout_s)
        except BaseException:
            proc.stop()
            raise
        proc._remove_keys_file()  # read by the server by now
        return proc

    def _take_ready_line(self, line: str) -> bool:
        if not line.startswith(READY_PREFIX):
            return False
        fields = dict(p.split("=", 1) for p in line[len(READY_PREFIX):].split())
        self.ws_url, self.http_url = fields["ws"], fields["http"]
        return True

    def _wait_ready_in_file(self, log_path: Path, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            lines = log_path.read_text(errors="replace").splitlines()
            if any(self._take_ready_line(line) for line in lines):
                return
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.output.extend(lines[-30:])
                what = (f"exited with {self.popen.returncode}" if self.popen.poll() is not None
                        else f"not ready after {timeout_s:g} s")
                tail = "\n".join(lines[-30:])
                raise VenueProcessError(f"venue {self.name!r} {what}; last output:\n{tail}")
            time.sleep(0.05)

    def _wait_ready(self, timeout_s: float) -> None:
        ready = threading.Event()

        def drain() -> None:
            assert self.popen.stdout is not None
            for line in self.popen.stdout:
                line = line.rstrip("\n")
                self.output.append(line)
                if not ready.is_set() and self._take_ready_line(line):
                    ready.set()

        self._drain = threading.Thread(target=drain, name=f"venue-{self.name}-out", daemon=True)
        self._drain.start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.05):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self._drain.join(1.0)
                what = (f"exited with {self.popen.returncode}" if self.popen.poll() is not None
                        else f"not ready after {timeout_s:g} s")
                tail = "\n".join(list(self.output)[-30:])
                raise VenueProcessError(f"venue {self.name!r} {what}; last output:\n{tail}")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after ``stop_timeout_s``; waits and returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(self.stop_timeout_s)
        if self._drain is not None:
            self._drain.join(2.0)
        self._remove_keys_file()
        return int(self.popen.returncode)

    def _remove_keys_file(self) -> None:
        if self._keys_file is not None:
            with contextlib.suppress(OSError):
                self._keys_file.unlink()
            self._keys_file = None

    def __enter__(self) -> VenueProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"VenueProcess(name={self.name!r}, pid={self.popen.pid}, ws_url={self.ws_url!r},"
                f" clients={sorted(self.keys)})")


# --- command line ------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bastion venue", description="Deribit-like venue")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a venue simulator until SIGTERM/SIGINT")
    serve.add_argument("--name", required=True)
    serve.add_argument("--port", type=int, default=0, help="0 picks a free port")
    serve.add_argument("--data", type=Path, help="OHLCV CSV(.gz) to replay (default: bundled)")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--keys", type=Path, help="JSON file {client_id: client_secret}")
    serve.add_argument("--synthetic", action="store_true", help="seeded synthetic market data")
    serve.add_argument("--speedup", type=float, default=60.0,
                       help="market-data seconds per wall second")
    serve.add_argument("--options", action="store_true", help="list a BTC option chain")
    serve.add_argument("--latency-s", type=float, default=0.0, help="added request latency")
    serve.add_argument("--min-heartbeat-s", type=float, default=10.0,
                       help="smallest public/set_heartbeat interval accepted")
    serve.add_argument("--cod-cancels-account-orders", action="store_true",
                       help="cancel-on-disconnect cancels every open order of the account")
    serve.add_argument("--max-queue-messages", type=int, default=2000,
                       help="per-connection outgoing queue (market data is conflated)")
    serve.add_argument("--replay-from", type=_utc_epoch_s, metavar="ISO_TIME",
                       help="replay from this bar on, e.g. 2021-05-19T12:55Z")
    serve.add_argument("--l1-load-rate", type=float, default=0.0, metavar="EVENTS_PER_S",
                       help="extra top-of-book events/s on the binary feed (load generator)")
    serve.add_argument("--exit-with-parent", action="store_true",
                       help="stop when the parent process exits (used by VenueProcess)")
    return parser


def _utc_epoch_s(text: str) -> float:
    """``2021-05-19T12:55Z`` (or any ISO-8601 time; naive means UTC) as epoch seconds."""
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _load_keys(path: Path | None, name: str) -> tuple[dict[str, str], Path | None]:
    if path is not None:
        keys = json.loads(path.read_text())
        if not isinstance(keys, dict):
            raise SystemExit(f"--keys {path}: must hold a JSON object {{client_id: secret}}")
        return {str(k): str(v) for k, v in keys.items()}, None
    keys = {f"sim-{name}": secrets.token_hex(16)}
    fd, out = tempfile.mkstemp(prefix=f"bastion-venue-{name}-keys-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f)
    return keys, Path(out)


def _say(text: str) -> None:
    """Print to stdout; a reader that went away (parent killed) must not stop the server."""
    with contextlib.suppress(OSError, ValueError):
        print(text, flush=True)


async def _watch_parent(parent_pid: int, stop: asyncio.Event, interval_s: float = 1.0) -> None:
    while not stop.is_set():
        if os.getppid() != parent_pid:
            stop.set()
            _say("venue: parent process exited, stopping")
        await asyncio.sleep(interval_s)


async def _serve(config: ServerConfig, keys_file: Path | None, exit_with_parent: bool) -> None:
    server = VenueServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if exit_with_parent:
        loop.create_task(_watch_parent(os.getppid(), stop))
    _say(f"venue {config.name}: clients {', '.join(sorted(config.keys))}")
    if keys_file is not None:
        _say(f"venue {config.name}: generated keys written to {keys_file}")
    _say(f"venue {config.name}: WebSocket {server.ws_url}  HTTP {server.http_url}")
    _say(f"{READY_PREFIX}ws={server.ws_url} http={server.http_url}")
    try:
        await stop.wait()
    finally:
        _say(f"venue {config.name}: stopping")
        await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys, generated = _load_keys(args.keys, args.name)
    config = ServerConfig(
        name=args.name, port=args.port, keys=keys, seed=args.seed, data=args.data,
        synthetic=args.synthetic, speedup=args.speedup, with_options=args.options,
        latency_s=args.latency_s, heartbeat_min_interval_s=args.min_heartbeat_s,
        cod_cancels_account_orders=args.cod_cancels_account_orders,
        max_queue_messages=args.max_queue_messages, l1_load_rate_per_s=args.l1_load_rate,
        replay_start_s=args.replay_from)
    asyncio.run(_serve(config, generated, args.exit_with_parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
