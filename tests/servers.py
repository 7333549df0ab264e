"""Real servers the tests run on 127.0.0.1, and a fault injector placed in front of them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


@contextlib.contextmanager
def transformers_serve(model_dir: Path, log: Path) -> Iterator[str]:
    """`transformers serve` (a real OpenAI-compatible server) for a local model folder."""
    port = free_port()
    cli = Path(sys.executable).with_name("transformers")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(cli), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(f"http://127.0.0.1:{port}/health", 120, process)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            process.terminate()
            process.wait(timeout=30)


class FaultInjectingProxy:
    """Fault injector: forwards requests to a real server, except that each request first
    takes the next scripted fault: an HTTP status ("429", "500", "503"), "timeout" (answers
    after ``hang_s``) or "drop" (closes the connection without an answer). An empty script
    forwards everything; once the script is used up, ``always`` (if set) is the fault of
    every request (a server that stays down), after ``forwards_left`` more forwards."""

    # A server that echoes the credentials it was sent in its error body; one that asks to be
    # left alone for a day; a proxy that answers 200 with an HTML page.
    ANSWERS: ClassVar[dict] = {
        "echo401": lambda h: (401, {"Content-Type": "application/json"},
                              json.dumps({"error": f"invalid credentials: {h.get('Authorization')}"})),
        "retry-after-day": lambda h: (503, {"Retry-After": "100000"}, ""),
        "html200": lambda h: (200, {"Content-Type": "text/html"}, "<html><body>Gateway login</body></html>"),
    }  # fmt: skip

    def __init__(self, upstream: str, hang_s: float = 3.0):
        self.upstream = upstream.rstrip("/")
        self.hang_s = hang_s
        self.script: list[str] = []
        self.always: str | None = None
        self.forwards_left: int | None = None  # with ``always``: forward this many, then fail
        self.seen: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fault = proxy._next_fault()
                proxy.seen.append(fault or "forward")
                if fault == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "timeout":
                    time.sleep(proxy.hang_s)
                if fault and fault.isdigit():
                    self.send_response(int(fault))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault and fault in proxy.ANSWERS:  # scripted answers of a misbehaving server
                    status, headers, text = proxy.ANSWERS[fault](self.headers)
                    payload = text.encode()
                    self.send_response(status)
                    for name, value in {**headers, "Content-Length": str(len(payload))}.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                request = urllib.request.Request(
                    proxy.upstream + self.path.removeprefix("/v1"),
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=120) as answer:
                    payload = answer.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _next_fault(self) -> str | None:
        with self._lock:
            if self.script:
                fault = self.script.pop(0)
                return None if fault == "forward" else fault
            if self.forwards_left:
                self.forwards_left -= 1
                return None
            return self.always

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def moto_s3(log: Path) -> Iterator[str]:
    """moto's server mode: a real S3-compatible HTTP server on 127.0.0.1 (in memory)."""
    port = free_port()
    cli = Path(sys.executable).with_name("moto_server")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(cli), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
        try:
            wait_for(f"http://127.0.0.1:{port}/moto-api/", 60, process)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=30)


PG_BIN = Path(os.environ.get("BFT_PG_BIN", "/usr/lib/postgresql/15/bin"))


@contextlib.contextmanager
def private_postgres(password: str) -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (initdb + pg_ctl), with a password-
    protected superuser `bft` and a database `dagster`. As root it runs as the `postgres`
    system user: PostgreSQL refuses to run as root."""
    port = str(free_port())
    folder = Path(tempfile.mkdtemp(prefix="bft-pg-", dir="/tmp"))
    data, pwfile = folder / "data", folder / "pw"
    pwfile.write_text(password + "\n")
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(pwfile, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, text=True)

    pg(str(PG_BIN / "initdb"), "-D", str(data), "-U", "bft", "--auth=scram-sha-256",
       f"--pwfile={pwfile}", "--encoding=UTF8")  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder}"
    pg(
        str(PG_BIN / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        options,
        "-l",
        str(folder / "log"),
        "-w",
        "start",
    )
    try:
        env = {**os.environ, "PGPASSWORD": password}
        subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", port, "-U", "bft", "dagster"],
                       check=True, env=env, capture_output=True)  # fmt: skip
        yield {
            "host": "127.0.0.1",
            "port": port,
            "user": "bft",
            "db": "dagster",
            "log": str(folder / "log"),
        }
    finally:
        pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def dagster_dev(workspace: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    """`dagster dev` (webserver and daemon) on 127.0.0.1 for the instance in env's
    DAGSTER_HOME; yields the webserver's URL. The whole process group is stopped after."""
    port = free_port()
    dagster = Path(sys.executable).with_name("dagster")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(dagster), "dev", "-w", str(workspace), "-h", "127.0.0.1", "-p", str(port)],
            cwd=workspace.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(f"http://127.0.0.1:{port}/server_info", 180, process)
            yield f"http://127.0.0.1:{port}"
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


# What the UI sends to launch a backfill of some partitions of some assets.
LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    """One request to the webserver's GraphQL endpoint (what the UI sends)."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"{url}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    if answer.get("errors"):
        raise RuntimeError(f"GraphQL errors: {answer['errors']}")
    return answer["data"]
