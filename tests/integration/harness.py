"""Drive a real `casd serve` process and `casctl` as subprocesses, as a user would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
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

    def start(self, timeout: float = 20.0) -> Daemon:
        logf = open(self.log, "ab")  # noqa: SIM115 - the daemon owns it until it exits
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            [
                str(BIN / "casd"),
                "serve",
                "--data",
                str(self.data),
                "--listen",
                "127.0.0.1:0",
                "--grace",
                "2",
                *self.args,
            ],
            stdout=logf,
            stderr=logf,
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
) -> Result:
    address = daemon if isinstance(daemon, str) else daemon.address
    p = subprocess.run(
        [str(BIN / "casctl"), "--server", address, *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return Result(p.returncode, p.stdout, p.stderr.decode(errors="replace"))


def ok(r: Result) -> Result:
    assert r.code == 0, f"casctl failed ({r.code}): {r.err}"
    return r
