"""Drive a real `casd serve` process and `casctl` as subprocesses, as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

READY = re.compile(r"ready: listening on (\S+):(\d+),")
BIN = Path(sys.executable).parent


@dataclass
class Daemon:
    data: Path
    log: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    listen: str = "127.0.0.1:0"
    prefix: list[str] = field(default_factory=list)  # e.g. `ip netns exec NS`
    env: dict[str, str] = field(default_factory=dict)  # set in the daemon's environment

    def start(self, timeout: float = 20.0) -> Daemon:
        logf = open(self.log, "ab")  # noqa: SIM115 - the daemon owns it until it exits
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                str(BIN / "casd"),
                "serve",
                "--data",
                str(self.data),
                "--listen",
                self.listen,
                "--grace",
                "2",
                *self.args,
            ],
            stdout=logf,
            stderr=logf,
            env={**os.environ, **self.env},
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            if m := READY.search(text):
                self.address = f"{m.group(1)}:{m.group(2)}"
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"casd exited early:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"casd did not become ready:\n{self.log.read_text()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class Result:
    code: int
    out: bytes
    err: str

    @property
    def json(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.out)  # type: ignore[no-any-return]

    @property
    def text(self) -> str:
        return self.out.decode()


def casctl(
    daemon: Daemon | str,
    *args: str,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    prefix: list[str] | None = None,
) -> Result:
    """Run casctl against ``daemon``; in the daemon's namespace unless ``prefix`` says."""
    address = daemon if isinstance(daemon, str) else daemon.address
    if prefix is None:
        prefix = [] if isinstance(daemon, str) else daemon.prefix
    p = subprocess.run(
        [*prefix, str(BIN / "casctl"), "--server", address, *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return Result(p.returncode, p.stdout, p.stderr.decode(errors="replace"))


def ok(r: Result) -> Result:
    assert r.code == 0, f"casctl failed ({r.code}): {r.err}"
    return r


def real_data(n: int) -> bytes:
    """n bytes of real files (this Python's standard library), in a stable order."""
    out = bytearray()
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            out += path.read_bytes()
            if len(out) >= n:
                break
    assert len(out) >= n, "not enough real data on this machine"
    return bytes(out[:n])


def put_many(daemon: Daemon, blobs: dict[str, bytes]) -> None:
    """Store many named blobs over one connection (setup for tests, not what is tested)."""
    import trio

    from casd.chunking import DEFAULT_PARAMS, Chunker
    from casd.client import open_client

    async def run() -> None:
        async with open_client(daemon.address) as client:
            chunker = Chunker(client.chunker_params or DEFAULT_PARAMS)
            for name, data in blobs.items():
                await client.push(iter(list(chunker.cut(data))), name=name)

    trio.run(run)


class CutProxy:
    """A TCP relay to ``target`` that breaks its first connection after ``limit`` bytes
    from the target: a transfer killed midway, at the same point on every run."""

    def __init__(self, target: str, limit: int) -> None:
        import socket
        import threading

        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._limit = limit
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.cut = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import socket
        import threading

        first = True
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            up = socket.create_connection(self._target)
            limit = self._limit if first else None
            first = False
            threading.Thread(target=self._pump, args=(down, up, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, limit), daemon=True).start()

    def _pump(self, src: object, dst: object, limit: int | None) -> None:
        import socket

        assert isinstance(src, socket.socket)
        assert isinstance(dst, socket.socket)
        moved = 0
        try:
            while data := src.recv(65536):
                if limit is not None and moved + len(data) > limit:
                    dst.sendall(data[: limit - moved])
                    self.cut.set()
                    break
                dst.sendall(data)
                moved += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._listener.close()
