#!/usr/bin/env python3
"""Sync benchmark: `casctl sync` against `rsync` over emulated WAN links, same data, same run.

    .venv/bin/python bench/sync.py                 # 256 MiB, links 100 Mbit/50 ms and 1 Gbit/5 ms
    .venv/bin/python bench/sync.py --quick         # 32 MiB, 100 Mbit/50 ms only (a smoke run)

Needs root, iproute2, iptables and rsync (Debian packages). For each link it builds two
hosts in network namespaces (tests/wanlink.py: veth, tbf rate limit, NFQUEUE delay), runs
`casd serve` on both, and measures from the hosts' interface counters (not from either
tool's own report):

- cold: host B syncs a tar of real files (/usr/lib, /usr/share, /usr/bin) from host A;
  throughput on the wire against the link rate;
- 1 % change: v2 replaces 1 % of the tar's bytes (whole files, new content); wire bytes
  and time of the sync, and of `rsync -z` updating B's copy of v1 to v2;
- no-op: a sync of 100 names that B already has;
- interrupted: a cold sync into a fresh store whose source is killed halfway, then run
  again; the wire bytes of both runs against one uninterrupted sync.

Prints a table and writes JSON under bench/results/. Ratios, not pass/fail.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.integration.harness import BIN, Daemon  # noqa: E402
from tests.wanlink import WanLink, available, measure_rtt  # noqa: E402

TOKEN = "bench-token"
SOURCES = ["/usr/lib", "/usr/share", "/usr/bin"]


def real_files(total: int) -> list[tuple[str, bytes]]:
    """Real files in sorted path order until ``total`` bytes."""
    out: list[tuple[str, bytes]] = []
    size = 0
    for root in SOURCES:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                try:
                    data = Path(p).read_bytes()
                except OSError:
                    continue
                out.append((p.lstrip("/"), data))
                size += len(data)
                if size >= total:
                    return out
    raise SystemExit(f"only {size} bytes of real files under {SOURCES}")


def write_tar(path: Path, files: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))


def changed_files(
    files: list[tuple[str, bytes]], fraction: float
) -> tuple[list[tuple[str, bytes]], int]:
    """A copy where whole files adding up to ``fraction`` of the bytes get new content."""
    import random

    total = sum(len(d) for _, d in files)
    target = int(total * fraction)
    out = list(files)
    changed = 0
    # Files picked at random (seeded: the same corpus every run), scattered through the
    # tar; none larger than what is left to change, so the total lands near the target.
    order = list(range(len(out)))
    random.Random(1).shuffle(order)
    for i in order:
        if changed >= target:
            break
        name, data = out[i]
        if not data or len(data) > max(target - changed, 4096):
            continue
        fresh = hashlib.shake_256(name.encode() + b"v2").digest(len(data)) if data else b""
        out[i] = (name, fresh)
        changed += len(data)
    return out, changed


def build_corpus(work: Path, mib: int) -> tuple[Path, Path, dict[str, Any]]:
    v1, v2 = work / f"v1-{mib}M.tar", work / f"v2-{mib}M.tar"
    files = real_files(mib * 1024 * 1024)
    new, changed = changed_files(files, 0.01)
    if not (v1.exists() and v2.exists()):
        write_tar(v1, files)
        write_tar(v2, new)
    return v1, v2, {"files": len(files), "bytes_changed": changed, "v1_size": v1.stat().st_size}


def wire(link: WanLink) -> int:
    c = link.b.counters()
    return int(c["rx_bytes"]) + int(c["tx_bytes"])


def casctl(host: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [*host.exec_prefix(), str(BIN / "casctl"), "--token", TOKEN, "-q", *args],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if check and p.returncode != 0:
        raise SystemExit(f"casctl {' '.join(args)} failed: {p.stderr}")
    return p


def measured(link: WanLink, fn: Any) -> tuple[int, float, Any]:
    before = wire(link)
    t = time.perf_counter()
    result = fn()
    return wire(link) - before, time.perf_counter() - t, result


def put_names(host: Any, address: str, n: int) -> None:
    code = (
        "import os, trio, sys\n"
        "from casd.client import open_client\n"
        "from casd.chunking import Chunker, DEFAULT_PARAMS\n"
        "async def main():\n"
        f"    async with open_client({address!r}, token={TOKEN!r}) as c:\n"
        f"        for i in range({n}):\n"
        "            data = os.urandom(4096)\n"
        "            await c.push(iter(list(Chunker().cut(data))), name=f'small/{i:03}')\n"
        "trio.run(main)\n"
    )
    subprocess.run([*host.exec_prefix(), sys.executable, "-c", code], check=True, timeout=300)


def run_link(
    rate: float, rtt: float, v1: Path, v2: Path, work: Path, names: int, idx: int
) -> dict[str, Any]:
    row: dict[str, Any] = {"rate_mbit": rate, "rtt_ms": rtt}
    with WanLink(rate_mbit=rate, rtt_ms=rtt, prefix="casdbench", subnet_index=idx) as link:
        rtts = sorted(measure_rtt(link.a, link.b, count=10))
        row["measured_rtt_ms"] = round(1000 * rtts[len(rtts) // 2], 2)
        stores = work / f"stores-{idx}"
        shutil.rmtree(stores, ignore_errors=True)
        stores.mkdir()

        def daemon(host: Any, name: str, port: int) -> Daemon:
            return Daemon(
                stores / name,
                stores / f"{name}.log",
                ["--token", TOKEN],
                listen=f"{host.addr}:{port}",
                prefix=host.exec_prefix(),
            ).start()

        a, b = daemon(link.a, "a", 7420), daemon(link.b, "b", 7420)
        try:
            casctl(link.a, "--server", a.address, "put", str(v1), "--name", "tree")
            # cold
            w, t, _ = measured(
                link,
                lambda: casctl(link.b, "--server", b.address, "sync", a.address, b.address, "tree"),
            )
            row.update(
                cold_wire=w,
                cold_s=t,
                cold_mbit=w * 8 / t / 1e6,
                cold_of_link=w * 8 / t / 1e6 / rate,
                cold_data_mbit=v1.stat().st_size * 8 / t / 1e6,
            )
            # 1 % change
            casctl(link.a, "--server", a.address, "put", str(v2), "--name", "tree")
            w, t, _ = measured(
                link,
                lambda: casctl(link.b, "--server", b.address, "sync", a.address, b.address, "tree"),
            )
            row.update(change_wire=w, change_s=t, change_of_data=w / v2.stat().st_size)
            # no-op sync of many names
            put_names(link.a, a.address, names)
            casctl(link.b, "--server", b.address, "sync", a.address, b.address, "--all")
            w, t, _ = measured(
                link,
                lambda: casctl(
                    link.b, "--server", b.address, "sync", a.address, b.address, "--all"
                ),
            )
            row.update(noop_names=names + 1, noop_wire=w, noop_s=t)
            # interrupted: a fresh store on B, the source killed halfway, then a re-run
            c = daemon(link.b, "c", 7421)
            try:
                half = row["cold_wire"] // 2
                before = wire(link)
                proc = subprocess.Popen(
                    [
                        *link.b.exec_prefix(),
                        str(BIN / "casctl"),
                        "--token",
                        TOKEN,
                        "-q",
                        "--server",
                        c.address,
                        "sync",
                        a.address,
                        c.address,
                        "tree",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                deadline = time.monotonic() + 600
                while (
                    wire(link) - before < half
                    and proc.poll() is None
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.01)
                a.kill()
                proc.communicate(timeout=120)
                first = wire(link) - before
                a.start()
                w, t, _ = measured(
                    link,
                    lambda: casctl(
                        link.b, "--server", c.address, "sync", a.address, c.address, "tree"
                    ),
                )
                # The uninterrupted reference: the same sync of v2 into an empty store.
                row.update(
                    interrupted_first_wire=first,
                    interrupted_rerun_wire=w,
                    interrupted_exit=proc.returncode,
                )
            finally:
                c.kill()
            d = daemon(link.b, "d", 7422)
            try:
                w, t, _ = measured(
                    link,
                    lambda: casctl(
                        link.b, "--server", d.address, "sync", a.address, d.address, "tree"
                    ),
                )
                row.update(
                    uninterrupted_wire=w,
                    interrupted_total_over_one=(
                        row["interrupted_first_wire"] + row["interrupted_rerun_wire"]
                    )
                    / w,
                )
            finally:
                d.kill()
        finally:
            a.kill()
            b.kill()
        row.update(rsync(link, v1, v2, work))
        row["delay_stats"] = getattr(link, "delay_stats", None)
    return row


def rsync(link: WanLink, v1: Path, v2: Path, work: Path) -> dict[str, Any]:
    if shutil.which("rsync") is None:
        return {"rsync": "not installed (apt-get install rsync)"}
    src = work / "rsync-src"
    dst = work / "rsync-dst"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    src.mkdir()
    dst.mkdir()
    shutil.copy(v1, src / "v1.tar")
    shutil.copy(v2, src / "v2.tar")
    conf = work / "rsyncd.conf"
    conf.write_text(
        f"use chroot = no\npid file = {work}/rsyncd.pid\n[data]\npath = {src}\nread only = yes\n"
    )
    daemon = link.a.popen(
        "rsync",
        "--daemon",
        "--no-detach",
        f"--config={conf}",
        f"--address={link.a.addr}",
        "--port=8730",
    )
    time.sleep(0.5)
    url = f"rsync://{link.a.addr}:8730/data"
    try:
        w, t, _ = measured(
            link, lambda: link.b.run("rsync", "-z", f"{url}/v1.tar", str(dst / "tree.tar"))
        )
        out = {"rsync_cold_wire": w, "rsync_cold_s": t}
        # v2 over the v1 copy: rsync's rolling-checksum delta (the default between hosts).
        w, t, _ = measured(
            link, lambda: link.b.run("rsync", "-z", f"{url}/v2.tar", str(dst / "tree.tar"))
        )
        out.update(rsync_change_wire=w, rsync_change_s=t)
        assert (
            hashlib.sha256((dst / "tree.tar").read_bytes()).digest()
            == hashlib.sha256(v2.read_bytes()).digest()
        )
        return out
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--links", default="100/50,1000/5", help="RATE_MBIT/RTT_MS, comma-separated")
    ap.add_argument("--names", type=int, default=100, help="names in the no-op sync")
    ap.add_argument("--quick", action="store_true", help="32 MiB on 100/50 only")
    ap.add_argument("--workdir", help="inputs and stores (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.links = 32, "100/50"
    if (why := available()) is not None:
        raise SystemExit(f"cannot emulate a WAN here: {why}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="casd-sync-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    v1, v2, corpus = build_corpus(work, args.size_mib)
    rows = []
    for idx, spec in enumerate(args.links.split(",")):
        rate, rtt = (float(x) for x in spec.split("/"))
        print(f"[{spec}] running ...", file=sys.stderr)
        rows.append(run_link(rate, rtt, v1, v2, work, args.names, 40 + idx))
    print(
        f"\ncorpus: tar of {corpus['files']} real files, {corpus['v1_size']:,} B; "
        f"v2 replaces {corpus['bytes_changed']:,} B "
        f"({100 * corpus['bytes_changed'] / corpus['v1_size']:.2f} %)"
    )
    print(
        f"{'link':>10} | {'cold wire':>12} {'time':>6} {'Mbit/s':>7} {'of link':>7} | "
        f"{'1% casd':>10} {'time':>6} {'of data':>7} | {'1% rsync':>10} {'time':>6} | "
        f"{'noop':>7} {'time':>5} | {'intr+rerun':>10}"
    )
    for r in rows:
        print(
            f"{r['rate_mbit']:>5.0f}/{r['rtt_ms']:<3.0f}  | "
            f"{r['cold_wire']:>12,} {r['cold_s']:>5.1f}s "
            f"{r['cold_mbit']:>7.1f} {100 * r['cold_of_link']:>6.1f}% | {r['change_wire']:>10,} "
            f"{r['change_s']:>5.1f}s {100 * r['change_of_data']:>6.2f}% | "
            f"{r.get('rsync_change_wire', 0):>10,} {r.get('rsync_change_s', 0):>5.1f}s | "
            f"{r['noop_wire']:>7,} {r['noop_s']:>4.2f}s | {r['interrupted_total_over_one']:>9.3f}x"
        )
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    out = results / f"sync-{time.strftime('%Y%m%d-%H%M%S')}.json"
    env = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "corpus": corpus,
        "size_mib": args.size_mib,
    }
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=2, default=str))
    print(f"\nwrote {out}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
