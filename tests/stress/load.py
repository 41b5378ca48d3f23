#!/usr/bin/env python3
"""Load: many clients pushing and pulling against one daemon; errors and peak memory.

    .venv/bin/python -m tests.stress.load [--clients 64] [--seconds 60]

Every client loops: push a blob (1-4 MB, half of it shared with other clients' blobs so
dedup paths run too), pull it back, compare. Prints operations, errors (must be 0),
throughput and the daemon's peak RSS (VmHWM), which must stay under 512 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from casd.chunking import Chunker
from casd.client import open_client
from tests.integration.harness import Daemon

RSS_LIMIT = 512 * 1024 * 1024


@dataclass
class Figures:
    clients: int
    seconds: float
    pushes: int = 0
    pulls: int = 0
    errors: int = 0
    bytes_moved: int = 0
    peak_rss: int = 0

    def ok(self) -> bool:
        return self.errors == 0 and self.pushes > 0 and self.peak_rss < RSS_LIMIT


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def client_loop(address: str, n: int, until: float, shared: bytes, fig: Figures) -> None:
    chunker = Chunker()
    try:
        async with open_client(address) as c:
            i = 0
            while trio.current_time() < until:
                own = hashlib.shake_256(f"{n}-{i}".encode()).digest(
                    1_000_000 + (n * 7919 + i * 104729) % 2_000_000
                )
                data = own + shared
                await c.push(iter(list(chunker.cut(data))), name=f"load/{n}/{i % 4}")
                fig.pushes += 1
                out = io.BytesIO()
                await c.pull(f"load/{n}/{i % 4}", out)
                fig.pulls += 1
                if out.getvalue() != data:
                    fig.errors += 1
                    print(f"client {n}: pulled bytes differ", file=sys.stderr)
                fig.bytes_moved += 2 * len(data)
                i += 1
    except Exception as exc:  # count, report, and keep the other clients going
        fig.errors += 1
        print(f"client {n}: {type(exc).__name__}: {exc}", file=sys.stderr)


def run(clients: int, seconds: float, work: Path) -> Figures:
    daemon = Daemon(work / "data", work / "casd.log").start()
    fig = Figures(clients, seconds)
    shared = os.urandom(1_000_000)
    try:

        async def main() -> None:
            until = trio.current_time() + seconds
            async with trio.open_nursery() as nursery:
                for n in range(clients):
                    nursery.start_soon(client_loop, daemon.address, n, until, shared, fig)

        start = time.perf_counter()
        trio.run(main)
        fig.seconds = time.perf_counter() - start
        assert daemon.proc is not None
        fig.peak_rss = peak_rss(daemon.proc.pid)
        if "crashed" in daemon.log.read_text():
            fig.errors += 1
            print("the daemon log reports a crashed handler", file=sys.stderr)
    finally:
        daemon.stop()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        fig = run(args.clients, args.seconds, Path(d))
    print(
        f"clients={fig.clients} seconds={fig.seconds:.1f} pushes={fig.pushes} pulls={fig.pulls} "
        f"errors={fig.errors} moved={fig.bytes_moved / 1e6:.0f} MB "
        f"({fig.bytes_moved / 1e6 / fig.seconds:.0f} MB/s) peak_rss={fig.peak_rss / 2**20:.0f} MiB"
    )
    sys.exit(0 if fig.ok() else 1)


if __name__ == "__main__":
    main()
