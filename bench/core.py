#!/usr/bin/env python3
"""Core benchmark: casctl put/get against the plain tools, on the same real data, same run.

    .venv/bin/python bench/core.py [--sizes 256,1024] [--workdir DIR]

For each size (MiB) it builds a file from real files on this machine (/usr/lib, /usr/share,
/usr/bin, in sorted path order), starts a fresh `casd serve` on loopback, and measures:

- put: `casctl put FILE` against `sha256sum FILE` (the physical floor is one read-and-hash);
- delta put: v2 = 10 scattered small edits (inserts, deletes, overwrites); wire bytes of
  `casctl put v2` against the file size and against the ideal (the bytes of v2's chunks
  that v1 lacks, raw and zstd'd);
- get: `casctl get` against `cat FILE > /dev/null`, and a get seeded with v1.

All inputs are warm in the page cache before timing. Prints a table; writes JSON under
bench/results/. Numbers are ratios side by side, never pass/fail.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
READY = re.compile(r"ready: listening on (\S+):(\d+),")
SOURCES = ["/usr/lib", "/usr/share", "/usr/bin"]


def build_real_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    written = 0
    with open(path, "wb") as out:
        for root in SOURCES:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    p = os.path.join(dirpath, name)
                    if os.path.islink(p) or not os.path.isfile(p):
                        continue
                    try:
                        with open(p, "rb") as f:
                            data = f.read(size - written)
                    except OSError:
                        continue
                    out.write(data)
                    written += len(data)
                    if written >= size:
                        return
    raise SystemExit(f"only {written} bytes of real files found under {SOURCES}")


def make_v2(v1: Path, v2: Path, seed: int = 7) -> list[str]:
    """Ten scattered small edits: inserts, deletes and overwrites of 1-200 bytes."""
    data = bytearray(v1.read_bytes())
    rng = random.Random(seed)
    edits = []
    positions = sorted(rng.sample(range(1000, len(data) - 1000), 10), reverse=True)
    for i, pos in enumerate(positions):
        n = rng.randint(1, 200)
        kind = ("insert", "delete", "overwrite")[i % 3]
        if kind == "insert":
            data[pos:pos] = rng.randbytes(n)
        elif kind == "delete":
            del data[pos : pos + n]
        else:
            data[pos : pos + n] = rng.randbytes(n)
        edits.append(f"{kind} {n}B at {pos}")
    v2.write_bytes(data)
    return edits


def ideal_delta(v1: Path, v2: Path) -> tuple[int, int, int]:
    """(new chunks, their raw bytes, their zstd-3 bytes) of v2 against v1, as casd cuts."""
    sys.path.insert(0, str(HERE.parent))
    from casd import zstd
    from casd.chunking import Chunker, chunk_id

    chunker = Chunker()
    have = {chunk_id(v) for v in chunker.cut(v1.read_bytes())}
    n = raw = packed = 0
    seen: set[bytes] = set()
    for v in chunker.cut(v2.read_bytes()):
        cid = chunk_id(v)
        if cid in have or cid in seen:
            continue
        seen.add(cid)
        n += 1
        raw += len(v)
        packed += min(len(v), len(zstd.compress(v, 3)))
    return n, raw, packed


class Daemon:
    def __init__(self, data: Path, log: Path) -> None:
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                [str(BIN / "casd"), "serve", "--data", str(data), "--listen", "127.0.0.1:0"],
                stdout=f,
                stderr=f,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if m := READY.search(log.read_text(errors="replace")):
                self.address = f"{m.group(1)}:{m.group(2)}"
                return
            time.sleep(0.05)
        raise SystemExit(f"casd did not start:\n{log.read_text()}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def timed(cmd: list[str] | str, **kw: object) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, shell=isinstance(cmd, str), **kw)  # type: ignore[call-overload]
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed: {p.stderr.decode(errors='replace')}")
    return dt, p


def casctl(addr: str, *args: str) -> tuple[float, dict[str, object]]:
    dt, p = timed([str(BIN / "casctl"), "--server", addr, "-q", *args, "--json"])
    return dt, json.loads(p.stdout)


def run_size(mib: int, work: Path) -> dict[str, object]:
    size = mib * 1024 * 1024
    v1 = work / f"real-{mib}M.v1"
    v2 = work / f"real-{mib}M.v2"
    print(f"[{mib} MiB] building input from {', '.join(SOURCES)} ...", file=sys.stderr)
    build_real_file(v1, size)
    edits = make_v2(v1, v2)
    for f in (v1, v2):
        subprocess.run(f"cat {f} > /dev/null", shell=True, check=True)  # warm the page cache
    t_sha, _ = timed(["sha256sum", str(v1)])
    t_cat, _ = timed(f"cat {v1} > /dev/null")
    data_dir = work / f"store-{mib}"
    shutil.rmtree(data_dir, ignore_errors=True)
    d = Daemon(data_dir, work / f"casd-{mib}.log")
    try:
        t_put, put = casctl(d.address, "put", str(v1), "--name", "v1")
        t_put2, put2 = casctl(d.address, "put", str(v2), "--name", "v2")
        out = work / "out.bin"
        t_get, get = casctl(d.address, "get", "v1", "-o", str(out))
        t_seed, seeded = casctl(d.address, "get", "v2", "-o", str(out), "--seed", str(v1))
    finally:
        d.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == str(seeded["digest"])[7:]
    n_new, raw_new, zstd_new = ideal_delta(v1, v2)
    return {
        "size_mib": mib,
        "sha256sum_s": t_sha,
        "cat_s": t_cat,
        "put_s": t_put,
        "put_over_sha256sum": t_put / t_sha,
        "put_wire_bytes": put["wire_bytes"],
        "delta_edits": edits,
        "delta_put_s": t_put2,
        "delta_wire_bytes": put2["wire_bytes"],
        "delta_chunks_sent": put2["chunks_transferred"],
        "delta_wire_fraction": int(put2["wire_bytes"]) / size,  # type: ignore[call-overload]
        "ideal_new_chunks": n_new,
        "ideal_new_raw_bytes": raw_new,
        "ideal_new_zstd_bytes": zstd_new,
        "delta_wire_over_ideal_raw": int(put2["wire_bytes"]) / max(raw_new, 1),  # type: ignore[call-overload]
        "get_s": t_get,
        "get_over_cat": t_get / t_cat,
        "get_wire_bytes": get["wire_bytes"],
        "seeded_get_s": t_seed,
        "seeded_get_wire_bytes": seeded["wire_bytes"],
        "seeded_get_chunks_fetched": seeded["chunks_transferred"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="256,1024", help="comma-separated sizes in MiB")
    ap.add_argument("--workdir", help="where inputs and stores go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the input files in --workdir")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="casd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for mib in (int(s) for s in args.sizes.split(",")):
            rows.append(run_size(mib, work))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"{'size':>6} | {'sha256sum':>9} | {'put':>7} | {'put/sha':>7} | {'cat':>6} | {'get':>6} "
        f"| {'get/cat':>7} | {'seeded':>6} | {'delta wire':>11} | {'of size':>7} | {'/ideal':>6}"
    )
    for r in rows:
        print(
            f"{r['size_mib']:>4}Mi | {r['sha256sum_s']:>8.2f}s | {r['put_s']:>6.2f}s | "
            f"{r['put_over_sha256sum']:>6.2f}x | {r['cat_s']:>5.2f}s | {r['get_s']:>5.2f}s | "
            f"{r['get_over_cat']:>6.1f}x | {r['seeded_get_s']:>5.2f}s | "
            f"{r['delta_wire_bytes']:>11,} | {100 * r['delta_wire_fraction']:>6.2f}% | "
            f"{r['delta_wire_over_ideal_raw']:>5.2f}x"
        )
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    out = results / f"core-{time.strftime('%Y%m%d-%H%M%S')}.json"
    env = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
    }
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
