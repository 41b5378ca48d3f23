#!/usr/bin/env python3
"""The headline benchmark: casd against plain OCI pulls, on real image version series,
over emulated links (issue #6).

    .venv/bin/python bench/oci.py            # the corpus, 3 links; about 30 minutes
    .venv/bin/python bench/oci.py --quick    # tiny corpus, one link: the CI smoke run

Needs root, iproute2, iptables, Debian's docker-registry, skopeo, umoci and Go with the
klauspost pgzip and compress sources, for casd-gogzip (what .ci/run
installs), and matplotlib for the chart (`pip install -e '.[bench]'`).

What it does:

1. builds or reuses the corpus (bench/oci_corpus.py: image version series built with
   umoci from software fetched from PyPI and Debian; see bench/CORPUS.md);
2. once, on the machine's loopback: pushes every version to a docker-registry with
   skopeo, imports them into casd A (`casctl oci import`), converts each
   (`casctl oci convert`, the "converted" twin of the series) and pushes the converted
   images to the registry too, so plain pulls of both kinds come from the same registry;
3. for each link (rate and round-trip time), two hosts in network namespaces
   (tests/wanlink.py: veth, tbf rate limit, NFQUEUE delay): A runs the registry and
   casd A, B runs casd B. For each series and kind (as built, converted), version after
   version, B holding the previous one:
   - plain: `skopeo copy docker://A/REPO:vN oci:LAYOUT:vN` into a layout that holds
     v(n-1) (skopeo skips the layers it has, as a real host does);
   - casd: `casctl sync A B REPO:vN`, then `skopeo copy docker://B-casd/REPO:vN oci:...`
     over B's loopback (a standard client gets the image; its time counts);
   - the first version is the cold pull (B empty), both ways, and a third: skopeo from
     an empty casd on B whose OCI API pulls through from casd A (`casd serve
     --upstream`), so the sync and the client's pull overlap;
   - on converted series, also casd with deltas off (`casd serve --no-delta`), to see
     what delta encoding buys and costs (issue #7). The same sync run again differs
     by up to ~13 % here (pyapp v1->v2 over 100 Mbit/s, five runs: 1.35-1.53 s; both
     hosts share two cores), more than the 5 % the comparison asks about, so each
     step's sync is run --repeats times into each of the two
     (the new version removed and collected between, `casctl rm` and `gc --grace 0`;
     which goes first alternates) and the verdict compares their medians;
   bytes come from B's interface counters (both directions), never from a tool's own
   report; wall time per step; CPU seconds on each host.
4. per step, the ideal (the zstd size of the uncompressed chunks v(n) has and v(n-1)
   lacks) and the zstd --long encoding of v(n)'s new layers with v(n-1)'s as prefix;
5. prints a table, writes JSON to bench/results/, a PNG chart and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import oci_corpus  # noqa: E402

from tests.integration.harness import BIN, Daemon  # noqa: E402
from tests.wanlink import Host, WanLink, available, measure_rtt  # noqa: E402

TOKEN = "bench-oci-token"
LINKS = {"100/50": (100.0, 50.0), "1000/5": (1000.0, 5.0), "20/80": (20.0, 80.0)}
REGISTRY_PORT = 5000
CASD_PORT = 7420
OCI_PORT = 5001  # casd B's OCI pull API, on B's loopback
SKOPEO_CACHE = Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb")
CLK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- processes and measurements -----------------------------------------------------------


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process used so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(argv: list[str], timeout: float = 3600, **kw: Any) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def skopeo(*args: str, prefix: list[str] | None = None) -> None:
    # The blob-info cache makes skopeo remember blobs across runs (cross-repo mounts,
    # skipped work): gone before every copy, as on a fresh host.
    with contextlib.suppress(FileNotFoundError):
        SKOPEO_CACHE.unlink()
    policy = Path("/tmp/casd-bench-skopeo-policy.json")
    policy.write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
    run([*(prefix or []), "skopeo", "--policy", str(policy), *args])


def casctl(*args: str, prefix: list[str] | None = None, timeout: float = 3600) -> str:
    return run([*(prefix or []), str(BIN / "casctl"), "--token", TOKEN, *args], timeout).stdout


@dataclass
class Registry:
    root: Path
    addr: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self, prefix: list[str] | None = None) -> Registry:
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "cache": {"blobdescriptor": "inmemory"},
                "filesystem": {"rootdirectory": str(storage)},
            },
            "http": {"addr": self.addr, "secret": "casd-bench-not-a-secret"},
            "health": {"storagedriver": {"enabled": False}},
        }
        cfg = self.root / f"config-{self.addr.replace(':', '_')}.yml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        logf = open(self.root / "registry.log", "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(
            [*(prefix or []), "docker-registry", "serve", str(cfg)],
            stdout=logf,
            stderr=logf,
            stdin=subprocess.DEVNULL,
        )
        logf.close()
        deadline = time.monotonic() + 20
        probe = [*(prefix or []), "curl", "-sf", "-o", "/dev/null", f"http://{self.addr}/v2/"]
        while time.monotonic() < deadline:
            if subprocess.run(probe, check=False).returncode == 0:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"docker-registry did not start on {self.addr}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@contextlib.contextmanager
def daemon(
    data: Path,
    listen: str,
    host: Host | None = None,
    *extra: str,
    env: dict[str, str] | None = None,
) -> Iterator[Daemon]:
    d = Daemon(
        data,
        data.parent / f"{data.name}.log",
        ["--token", TOKEN, "--insecure", *extra],
        listen=listen,
        prefix=host.exec_prefix() if host else [],
        env=env or {},
    ).start(timeout=60)
    try:
        yield d
    finally:
        d.stop()


# --- the corpus and its preparation ---------------------------------------------------------


@dataclass
class Series:
    name: str
    kind_of_change: str
    layout: Path
    tags: list[str]


def load_series(corpus_dir: Path, names: list[str] | None) -> list[Series]:
    corpus = oci_corpus.load_corpus(corpus_dir)
    out = []
    for name, entry in corpus["series"].items():
        if names and name not in names:
            continue
        tags = [v["tag"] for v in entry["versions"]]
        out.append(Series(name, entry.get("kind", ""), corpus_dir / entry["layout"], tags))
    return out


def repo_of(series: Series, kind: str) -> str:
    return series.name if kind == "real" else f"{series.name}-casd"


def prepare(series: list[Series], work: Path) -> dict[str, Any]:
    """Registry and casd A's store, made once on the machine's loopback."""
    info: dict[str, Any] = {"converted": {}}
    reg = Registry(work / "registry", f"127.0.0.1:{REGISTRY_PORT + 100}").start()
    oci = f"127.0.0.1:{OCI_PORT + 100}"
    try:
        with daemon(
            work / "casd-a", f"127.0.0.1:{CASD_PORT + 100}", None, "--oci-listen", oci
        ) as a:
            for s in series:
                for tag in s.tags:
                    t0 = time.monotonic()
                    skopeo(
                        "copy",
                        "--dest-tls-verify=false",
                        "--preserve-digests",
                        f"oci:{s.layout}:{tag}",
                        f"docker://{reg.addr}/{s.name}:{tag}",
                    )
                    out = json.loads(
                        casctl(
                            "--server",
                            a.address,
                            "oci",
                            "import",
                            f"{reg.addr}/{s.name}:{tag}",
                            "--insecure",
                            "--json",
                        )
                    )
                    conv = json.loads(
                        casctl(
                            "--server",
                            a.address,
                            "oci",
                            "convert",
                            f"{s.name}:{tag}",
                            f"{repo_of(s, 'converted')}:{tag}",
                            "--json",
                        )
                    )
                    # The converted image goes to the registry too (from casd A's pull API):
                    # plain pulls of both kinds come from the same registry.
                    skopeo(
                        "copy",
                        "--src-tls-verify=false",
                        "--dest-tls-verify=false",
                        "--preserve-digests",
                        f"docker://{oci}/{conv['name']}",
                        f"docker://{reg.addr}/{conv['name']}",
                    )
                    info["converted"][f"{s.name}:{tag}"] = conv["digest"]
                    stored = {x["stored"] for x in out["layers"]}
                    log(
                        f"prepared {s.name}:{tag}: layers {sorted(stored)}, converted "
                        f"{conv['layers_converted']} ({time.monotonic() - t0:.1f}s)"
                    )
            stats = json.loads(casctl("--server", a.address, "stats", "--json"))
            info["casd_a_stored_bytes"] = stats["store_stored_bytes"]
    finally:
        reg.stop()
    return info


# --- one link -------------------------------------------------------------------------------


@dataclass
class Measure:
    wire: int
    seconds: float
    cpu_a: float
    cpu_b: float


@dataclass
class Step:
    link: str
    series: str
    kind: str  # "real" | "converted"
    step: str  # "cold v1" | "v1->v2"
    plain: Measure
    casd: Measure
    casd_chunks_only: Measure | None = None
    sync_report: dict[str, Any] = field(default_factory=dict)
    # `casctl sync --json` of the chunks-only run: what it moved, to set beside the above.
    sync_report_chunks_only: dict[str, Any] = field(default_factory=dict)
    # Where the chunks-only run is: the sync's own seconds and wire bytes (its report's)
    # on each run, the first being the measured one above; keys "casd", "chunks_only".
    sync_seconds: dict[str, list[float]] = field(default_factory=dict)
    sync_wire: dict[str, list[int]] = field(default_factory=dict)
    # After casd's run: B storing the tars of layers that came as their compressed bytes
    # (casd.oci.landing), which the next version's delta needs. Waited for before the
    # next measurement, so that no run shares the CPU with it; not in casd's time.
    casd_landing: Measure | None = None
    # Cold pulls only: skopeo from a third, empty casd on B whose OCI API pulls through
    # from A (`casd serve --upstream`): the sync and the client's pull overlap.
    casd_pull_through: Measure | None = None


class Meter:
    """Bytes on B's link interface (both directions), wall time, CPU of each host."""

    def __init__(self, link: WanLink, a_pids: list[int], b_pids: list[int]) -> None:
        self.link = link
        self.a_pids = a_pids
        self.b_pids = b_pids

    def _bytes(self) -> int:
        c = self.link.b.counters()
        return c["rx_bytes"] + c["tx_bytes"]

    @contextlib.contextmanager
    def measure(self, out: list[Measure]) -> Iterator[None]:
        w0, t0, kids0 = self._bytes(), time.perf_counter(), children_cpu()
        a0 = sum(map(cpu_of, self.a_pids))
        b0 = sum(map(cpu_of, self.b_pids))
        yield
        seconds = time.perf_counter() - t0
        wire = self._bytes() - w0
        cpu_a = sum(map(cpu_of, self.a_pids)) - a0
        # B: its daemon, plus the tools this script ran in B's namespace (skopeo, casctl).
        cpu_b = sum(map(cpu_of, self.b_pids)) - b0 + children_cpu() - kids0
        out.append(Measure(wire, round(seconds, 3), round(cpu_a, 2), round(cpu_b, 2)))


def sync(d: Daemon, src: str, name: str, host: Host) -> dict[str, Any]:
    """`casctl sync SRC D NAME --json`, run on ``host`` (B): its report."""
    return json.loads(
        casctl(
            "--server", d.address, "sync", src, d.address, name, "--json", prefix=host.exec_prefix()
        )
    )


def again(
    step: Step, daemons: dict[str, Daemon], src: str, name: str, host: Host, repeats: int
) -> None:
    """Run the step's sync ``repeats - 1`` more times into each of ``daemons``, each time
    from where it stood before (``name`` removed, what only it reached collected), the
    order alternating; record every run's seconds and wire bytes in ``step``."""
    first = {"casd": step.sync_report, "chunks_only": step.sync_report_chunks_only}
    step.sync_seconds = {k: [float(first[k]["seconds"])] for k in daemons}
    step.sync_wire = {k: [int(first[k]["wire_bytes"])] for k in daemons}
    for r in range(1, repeats):
        keys = list(daemons) if r % 2 == 0 else list(reversed(daemons))
        for key in keys:
            d = daemons[key]
            casctl("--server", d.address, "-q", "rm", name, prefix=host.exec_prefix())
            casctl("--server", d.address, "-q", "gc", "--grace", "0", prefix=host.exec_prefix())
            report = sync(d, src, name, host)
            wait_landed(d, host)
            step.sync_seconds[key].append(float(report["seconds"]))
            step.sync_wire[key].append(int(report["wire_bytes"]))
    log(
        f"  {name} again: "
        + "; ".join(
            f"{k} {' '.join(f'{x:.2f}' for x in step.sync_seconds[k])} s "
            f"({' '.join(f'{w / 1e6:.1f}' for w in step.sync_wire[k])} MB)"
            for k in daemons
        )
    )


def wait_landed(d: Daemon, host: Host, timeout: float = 600) -> None:
    """Until casd ``d`` has stored the tars of every layer it synced (casd.oci.landing)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = json.loads(
            casctl("--server", d.address, "stats", "--json", prefix=host.exec_prefix())
        )
        if not stats.get("oci_landings_pending"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"casd at {d.address} still has layers to land: {stats}")
        time.sleep(0.2)  # each poll is a casctl start: ~0.4 s of CPU on the other core


def run_link(
    name: str,
    idx: int,
    series: list[Series],
    kinds: list[str],
    work: Path,
    chunks_only: bool,
    cold_series: int,
    repeats: int = 1,
) -> tuple[dict[str, Any], list[Step]]:
    rate, rtt = LINKS[name]
    steps: list[Step] = []
    row: dict[str, Any] = {"link": name, "rate_mbit": rate, "rtt_ms": rtt}
    with WanLink(rate_mbit=rate, rtt_ms=rtt, prefix="casdoci", subnet_index=200 + idx) as link:
        rtts = sorted(measure_rtt(link.a, link.b, count=10))
        row["measured_rtt_ms"] = round(1000 * rtts[len(rtts) // 2], 2)
        A, _B = link.a, link.b
        reg = Registry(work / "registry", f"{A.addr}:{REGISTRY_PORT}").start(A.exec_prefix())
        try:
            with daemon(work / "casd-a", f"{A.addr}:{CASD_PORT}", A) as casd_a:
                assert reg.proc is not None
                assert casd_a.proc is not None
                a_pids = [reg.proc.pid, casd_a.proc.pid]
                for k, s in enumerate(series):
                    for kind in kinds:
                        # Deltas only ever apply to converted layers; the chunk-only
                        # comparison (issue #7) is on the 100 Mbit and 1 Gbit links.
                        nd = chunks_only and kind == "converted" and name in ("100/50", "1000/5")
                        cold = k < cold_series
                        steps += run_series(
                            link,
                            work,
                            s,
                            kind,
                            casd_a,
                            a_pids,
                            name,
                            nd,
                            measure_cold=cold,
                            repeats=repeats,
                        )
        finally:
            reg.stop()
    return row, steps


def run_series(
    link: WanLink,
    work: Path,
    s: Series,
    kind: str,
    casd_a: Daemon,
    a_pids: list[int],
    link_name: str,
    chunks_only: bool,
    *,
    measure_cold: bool = True,
    repeats: int = 1,
) -> list[Step]:
    A, B = link.a, link.b
    repo = repo_of(s, kind)
    scratch = work / "b" / f"{link_name.replace('/', '_')}-{s.name}-{kind}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    plain_layout, casd_layout = scratch / "plain-layout", scratch / "casd-layout"
    steps = []
    extra = ["--oci-listen", f"127.0.0.1:{OCI_PORT}"]
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(daemon(scratch / "casd-b", f"127.0.0.1:{CASD_PORT}", B, *extra))
        b_nd: Daemon | None = None
        if chunks_only:
            b_nd = stack.enter_context(
                daemon(
                    scratch / "casd-b-nodelta",
                    f"127.0.0.1:{CASD_PORT + 1}",
                    B,
                    "--no-delta",
                    "--oci-listen",
                    f"127.0.0.1:{OCI_PORT + 1}",
                )
            )
        assert b.proc is not None
        b_pids = [b.proc.pid] + ([b_nd.proc.pid] if b_nd and b_nd.proc else [])
        meter = Meter(link, a_pids, b_pids)
        src = f"{A.addr}:{CASD_PORT}"
        prev = None
        if not measure_cold:
            # B starts from v1 without measuring it, the rate limit lifted meanwhile.
            with link.unthrottled():
                first = s.tags[0]
                skopeo(
                    "copy",
                    "--src-tls-verify=false",
                    f"docker://{A.addr}:{REGISTRY_PORT}/{repo}:{first}",
                    f"oci:{plain_layout}:{first}",
                    prefix=B.exec_prefix(),
                )
                for d in [b] + ([b_nd] if b_nd else []):
                    sync(d, src, f"{repo}:{first}", B)
                skopeo(
                    "copy",
                    "--src-tls-verify=false",
                    f"docker://127.0.0.1:{OCI_PORT}/{repo}:{first}",
                    f"oci:{casd_layout}:{first}",
                    prefix=B.exec_prefix(),
                )
                for d in [b] + ([b_nd] if b_nd else []):
                    wait_landed(d, B)
                    # What B measured of the link from A while it was not limited is not
                    # the link the steps run on: B starts them knowing none, as a host
                    # that got v1 elsewhere would (or its syncs would take the fast
                    # figure, and move layers whole over 20 Mbit/s).
                    d.stop()
                    d.start(timeout=60)
                assert b.proc is not None
                meter.b_pids = [b.proc.pid] + ([b_nd.proc.pid] if b_nd and b_nd.proc else [])
            prev = first
        for tag in s.tags if measure_cold else s.tags[1:]:
            label = f"cold {tag}" if prev is None else f"{prev}->{tag}"
            got: list[Measure] = []
            with meter.measure(got):
                skopeo(
                    "copy",
                    "--src-tls-verify=false",
                    f"docker://{A.addr}:{REGISTRY_PORT}/{repo}:{tag}",
                    f"oci:{plain_layout}:{tag}",
                    prefix=B.exec_prefix(),
                )
            with meter.measure(got):
                report = sync(b, src, f"{repo}:{tag}", B)
                skopeo(
                    "copy",
                    "--src-tls-verify=false",
                    f"docker://127.0.0.1:{OCI_PORT}/{repo}:{tag}",
                    f"oci:{casd_layout}:{tag}",
                    prefix=B.exec_prefix(),
                )
            landing: list[Measure] = []
            with meter.measure(landing):
                wait_landed(b, B)
            report_nd: dict[str, Any] = {}
            if b_nd is not None:
                with meter.measure(got):
                    report_nd = sync(b_nd, src, f"{repo}:{tag}", B)
                    skopeo(
                        "copy",
                        "--src-tls-verify=false",
                        f"docker://127.0.0.1:{OCI_PORT + 1}/{repo}:{tag}",
                        f"oci:{scratch / 'nodelta-layout'}:{tag}",
                        prefix=B.exec_prefix(),
                    )
                wait_landed(b_nd, B)
            through: list[Measure] = []
            if prev is None:
                with daemon(
                    scratch / "casd-b-mirror",
                    f"127.0.0.1:{CASD_PORT + 2}",
                    B,
                    "--oci-listen",
                    f"127.0.0.1:{OCI_PORT + 2}",
                    "--upstream",
                    src,
                    env={"CASD_UPSTREAM_TOKEN": TOKEN},
                ) as mirror:
                    assert mirror.proc is not None
                    meter.b_pids.append(mirror.proc.pid)
                    try:
                        with meter.measure(through):
                            skopeo(
                                "copy",
                                "--src-tls-verify=false",
                                f"docker://127.0.0.1:{OCI_PORT + 2}/{repo}:{tag}",
                                f"oci:{scratch / 'mirror-layout'}:{tag}",
                                prefix=B.exec_prefix(),
                            )
                        wait_landed(mirror, B)
                    finally:
                        meter.b_pids.remove(mirror.proc.pid)
                check_same(plain_layout, scratch / "mirror-layout", tag)
            check_same(plain_layout, casd_layout, tag)
            step = Step(
                link_name, s.name, kind, label, got[0], got[1], got[2] if b_nd else None, report
            )
            step.sync_report_chunks_only = report_nd
            if b_nd is not None and prev is not None:
                again(step, {"casd": b, "chunks_only": b_nd}, src, f"{repo}:{tag}", B, repeats)
            if through:
                step.casd_pull_through = through[0]
            if report.get("layers_deferred"):
                step.casd_landing = landing[0]
            steps.append(step)
            log(
                f"{link_name} {s.name}/{kind} {label}: plain {step.plain.wire / 1e6:.1f} MB "
                f"{step.plain.seconds:.1f}s, casd {step.casd.wire / 1e6:.1f} MB "
                f"{step.casd.seconds:.1f}s"
                + (
                    f" (then {step.casd_landing.seconds:.1f}s storing tars)"
                    if step.casd_landing
                    else ""
                )
                + (
                    f", chunks only {step.casd_chunks_only.wire / 1e6:.1f} MB "
                    f"{step.casd_chunks_only.seconds:.1f}s"
                    if step.casd_chunks_only
                    else ""
                )
                + (
                    f", pull-through {step.casd_pull_through.wire / 1e6:.1f} MB "
                    f"{step.casd_pull_through.seconds:.1f}s"
                    if step.casd_pull_through
                    else ""
                )
            )
            prev = tag
    return steps


def check_same(plain: Path, casd: Path, tag: str) -> None:
    """Both layouts must hold the same manifest for ``tag``: casd served the exact image."""

    def digest(layout: Path) -> str:
        index = json.loads((layout / "index.json").read_text())
        for m in index["manifests"]:
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                return str(m["digest"])
        raise RuntimeError(f"{layout} has no {tag}")

    if digest(plain) != digest(casd):
        raise RuntimeError(f"casd served {digest(casd)} for {tag}, the registry {digest(plain)}")


# --- report ---------------------------------------------------------------------------------


def shares(corpus_dir: Path, series: list[Series], prefix: bool) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for st in oci_corpus.series_shares(corpus_dir, [s.name for s in series], prefix=prefix):
        out[f"{st.series}:{st.old}->{st.new}"] = asdict(st)
    return out


def table(steps: list[Step], share: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'link':<7} {'series':<8} {'kind':<9} {'step':<9} {'shared':>6} "
        f"{'plain MB':>9} {'casd MB':>8} {'ratio':>6} {'ideal MB':>8} {'c/ideal':>7} "
        f"{'prefix MB':>9} {'plain s':>8} {'casd s':>7} {'t ratio':>7} {'nodelta s':>9} "
        f"{'land s':>6} {'thru s':>6}"
    )
    lines = [head, "-" * len(head)]
    for st in steps:
        sh = share.get(f"{st.series}:{st.step}", {})
        ideal = sh.get("ideal_zstd_tarcut")
        prefix = sh.get("zstd_prefix")
        shared = sh.get("shared_image_tarcut")
        lines.append(
            f"{st.link:<7} {st.series:<8} {st.kind:<9} {st.step:<9} "
            f"{(f'{shared:.0%}' if shared is not None else '-'):>6} "
            f"{st.plain.wire / 1e6:>9.2f} {st.casd.wire / 1e6:>8.2f} "
            f"{st.casd.wire / max(st.plain.wire, 1):>6.2f} "
            f"{(f'{ideal / 1e6:.2f}' if ideal else '-'):>8} "
            f"{(f'{st.casd.wire / ideal:.2f}' if ideal else '-'):>7} "
            f"{(f'{prefix / 1e6:.2f}' if prefix else '-'):>9} "
            f"{st.plain.seconds:>8.1f} {st.casd.seconds:>7.1f} "
            f"{st.casd.seconds / max(st.plain.seconds, 1e-9):>7.2f} "
            f"{(f'{st.casd_chunks_only.seconds:.1f}' if st.casd_chunks_only else '-'):>9} "
            f"{(f'{st.casd_landing.seconds:.1f}' if st.casd_landing else '-'):>6} "
            f"{(f'{st.casd_pull_through.seconds:.1f}' if st.casd_pull_through else '-'):>6}"
        )
    return "\n".join(lines)


def verdicts(steps: list[Step], share: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    over = [
        (st, st.casd.wire / max(st.plain.wire, 1)) for st in steps if not st.step.startswith("cold")
    ]
    worst = max((r for _, r in over), default=0.0)
    out.append(
        f"steps where casd moved > 1.02x plain's bytes: "
        f"{sum(r > 1.02 for _, r in over)} of {len(over)} (worst {worst:.2f}x)"
    )
    conv = [
        st.casd.wire / share[k]["ideal_zstd_tarcut"]
        for st in steps
        if st.kind == "converted"
        and not st.step.startswith("cold")
        and (k := f"{st.series}:{st.step}") in share
        and share[k]["ideal_zstd_tarcut"]
    ]
    if conv:
        out.append(
            f"converted steps: casd / ideal median {statistics.median(conv):.2f}, "
            f"worst {max(conv):.2f} (target <= 1.15)"
        )
    for link in sorted({st.link for st in steps}):
        sel = [
            st
            for st in steps
            if st.link == link
            and st.kind == "converted"
            and not st.step.startswith("cold")
            and share.get(f"{st.series}:{st.step}", {}).get("shared_image_tarcut", 0) >= 0.5
        ]
        if sel:
            b = statistics.median(st.casd.wire / max(st.plain.wire, 1) for st in sel)
            t = statistics.median(st.casd.seconds / max(st.plain.seconds, 1e-9) for st in sel)
            out.append(
                f"{link}: converted steps sharing >= 50%: median casd/plain bytes "
                f"{b:.2f} (target <= 0.5), time {t:.2f} (target <= 0.6), n={len(sel)}"
            )
        cold = [st for st in steps if st.link == link and st.step.startswith("cold")]
        if cold:
            r = max(st.casd.seconds / max(st.plain.seconds, 1e-9) for st in cold)
            out.append(f"{link}: cold pulls, worst casd/plain time {r:.2f} (target <= 1.1)")
            through = [st for st in cold if st.casd_pull_through]
            if through:
                t = [st.casd_pull_through.seconds / max(st.plain.seconds, 1e-9) for st in through]  # type: ignore[union-attr]
                w = [st.casd_pull_through.wire / max(st.plain.wire, 1) for st in through]  # type: ignore[union-attr]
                out.append(
                    f"{link}: cold pulls through a casd mirror (skopeo from B, which pulls "
                    f"from A as they go): casd/plain time worst {max(t):.2f}, median "
                    f"{statistics.median(t):.2f}; bytes worst {max(w):.2f}"
                )
    prefix = [
        st.casd.wire / share[k]["zstd_prefix"]
        for st in steps
        if not st.step.startswith("cold")
        and (k := f"{st.series}:{st.step}") in share
        and share[k].get("zstd_prefix")
    ]
    if prefix:
        out.append(
            f"steps: casd / zstd --long prefix encoding: median "
            f"{statistics.median(prefix):.2f}, worst {max(prefix):.2f} (target <= 1.3)"
        )
    for link in sorted({st.link for st in steps}, key=lambda x: list(LINKS).index(x)):
        per = [
            (st, st.casd.wire / share[k]["zstd_prefix"])
            for st in steps
            if st.link == link
            and not st.step.startswith("cold")
            and (k := f"{st.series}:{st.step}") in share
            and share[k].get("zstd_prefix")
        ]
        if per:
            framed = sum(1 for st, _ in per if st.sync_report.get("chunk_delta_frames"))
            out.append(
                f"{link}: casd / prefix median {statistics.median(r for _, r in per):.2f}, "
                f"worst {max(r for _, r in per):.2f}; {sum(1 for _, r in per if r <= 1.3)} of "
                f"{len(per)} steps within 1.3x; missing chunks sent as frames on {framed}"
            )
    nd = [st for st in steps if st.casd_chunks_only and not st.step.startswith("cold")]
    runs = [st for st in nd if len(st.sync_seconds.get("casd", ())) > 1]
    for link in sorted({st.link for st in runs}):
        sel = [st for st in runs if st.link == link]
        n = min(len(st.sync_seconds[k]) for st in sel for k in ("casd", "chunks_only"))
        at_least = "" if all(len(v) == n for st in sel for v in st.sync_seconds.values()) else "+"

        def med(st: Step, k: str, what: str) -> float:
            return statistics.median(getattr(st, what)[k])

        def same(st: Step) -> bool:
            # Deltas allowed, nothing other crossed: no frame, the same bytes within 2 %
            # (per-chunk deltas that saved less). Its time against chunks only is then
            # the spread of runs, not what deltas cost.
            a, b = med(st, "casd", "sync_wire"), med(st, "chunks_only", "sync_wire")
            return not st.sync_report.get("chunk_delta_frames") and abs(a - b) <= 0.02 * b

        def ratio(st: Step) -> float:
            return med(st, "casd", "sync_seconds") / med(st, "chunks_only", "sync_seconds")

        rs = [ratio(st) for st in sel]
        alike = [ratio(st) for st in sel if same(st)]
        other = [ratio(st) for st in sel if not same(st)]
        saving = [
            st
            for st in sel
            if med(st, "casd", "sync_wire") < 0.95 * med(st, "chunks_only", "sync_wire")
        ]
        faster = [
            st
            for st in saving
            if med(st, "casd", "sync_seconds") < med(st, "chunks_only", "sync_seconds")
        ]
        out.append(
            f"{link}: delta allowed / chunks only, sync time, median of {n}{at_least} runs "
            f"each: worst {max(rs):.2f}, median {statistics.median(rs):.2f}; faster on "
            f"{len(faster)} of the {len(saving)} steps where deltas saved >= 5% of the bytes; "
            + (
                f"where deltas changed what crossed ({len(other)} steps) worst {max(other):.2f}"
                if other
                else "deltas changed what crossed on no step"
            )
            + (
                f"; where they did not ({len(alike)}: no frame, bytes within 2%), "
                f"{min(alike):.2f}-{max(alike):.2f}, the spread of runs"
                if alike
                else ""
            )
        )
    for link in sorted({st.link for st in nd}):
        rs = [
            st.casd.seconds / max(st.casd_chunks_only.seconds, 1e-9)  # type: ignore[union-attr]
            for st in nd
            if st.link == link
        ]
        pairs = [(st, st.casd_chunks_only) for st in nd if st.link == link]
        saving = [(a, b) for a, b in pairs if b is not None and a.casd.wire < 0.95 * b.wire]
        faster = len([a for a, b in saving if a.casd.seconds < b.seconds])
        out.append(
            f"{link}: delta allowed / chunks only, time of one run (sync and skopeo): "
            f"worst {max(rs):.2f}, "
            f"median {statistics.median(rs):.2f}; faster on {faster} of the {len(saving)} "
            "steps where deltas saved >= 5% of the bytes"
        )
    return out


def chart(steps: list[Step], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = sorted({st.link for st in steps}, key=lambda x: list(LINKS).index(x))
    fig, axes = plt.subplots(2, len(links), figsize=(6 * len(links), 8), squeeze=False)
    for col, link in enumerate(links):
        sel = [st for st in steps if st.link == link]
        labels = [f"{st.series}{'*' if st.kind == 'converted' else ''}\n{st.step}" for st in sel]
        x = range(len(sel))
        for row, (attr, unit, scale) in enumerate(
            (("wire", "MB on the wire", 1e6), ("seconds", "wall seconds", 1.0))
        ):
            ax = axes[row][col]
            ax.bar(
                [i - 0.2 for i in x],
                [getattr(st.plain, attr) / scale for st in sel],
                width=0.4,
                label="plain skopeo pull",
            )
            ax.bar(
                [i + 0.2 for i in x],
                [getattr(st.casd, attr) / scale for st in sel],
                width=0.4,
                label="casd sync + skopeo from B",
            )
            ax.set_ylabel(unit)
            ax.set_title(f"{link} (Mbit/s / ms RTT)")
            ax.set_xticks(list(x))
            ax.set_xticklabels(labels, rotation=90, fontsize=6)
            ax.set_yscale("log")
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle("casd vs plain OCI pulls (* = after casctl oci convert)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def gogzip_helper() -> str:
    """casd-gogzip (casd/oci/gogzip.py), built here if it is not: without it, casd keeps
    the as-built series' Go-written layers raw, and moves them whole."""
    from casd.oci import gogzip

    path = gogzip.helper()
    if path is None:
        try:
            path = str(gogzip.build())
        except OSError as exc:
            log(f"casd-gogzip not built ({exc}): the as-built series' layers stay raw")
            return f"none ({exc})"
    return f"{path}: {gogzip.helper_version(path)}"


def environment() -> dict[str, Any]:
    def ver(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.split(
                "\n"
            )[0]
        except OSError:
            return "missing"

    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu": next(
            (
                x.split(":", 1)[1].strip()
                for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")
            ),
            "",
        ),
        "python": platform.python_version(),
        "skopeo": ver("skopeo", "--version"),
        "docker-registry": ver("dpkg-query", "-W", "-f=${Version}", "docker-registry"),
        "umoci": ver("umoci", "--version"),
        "casd": ver(str(BIN / "casd"), "--version"),
        "git": ver("git", "-C", str(REPO), "rev-parse", "--short", "HEAD"),
    }


def write_results_md(
    path: Path, res: dict[str, Any], tab: str, verdict: list[str], png: Path, argv: list[str]
) -> None:
    env = res["environment"]
    corpus = res["corpus"]
    lines = [
        "# casd vs plain OCI pulls: results",
        "",
        f"Written by `{' '.join(argv)}` on {res['date']} from commit {env['git']} "
        f"({res['seconds'] / 60:.1f} minutes). JSON: `{res['json']}`. How the corpus was "
        "built: `bench/CORPUS.md` and `bench/corpus/corpus.json`.",
        "",
        "## Environment",
        "",
        *[f"- {k}: {v}" for k, v in env.items()],
        "",
        "## Corpus",
        "",
        *[f"- **{s['name']}** ({s['kind']}): versions {', '.join(s['tags'])}" for s in corpus],
        "",
        "Each series twice: as umoci built it (Go's pgzip: with casd-gogzip, casd makes such",
        "layers again byte for byte, so it moves their tar's chunks, as deltas; without it it",
        "keeps them as they came and moves them whole) and after `casctl oci convert` (casd's",
        "own gzip members, which re-encode several times faster).",
        "",
        "## Links",
        "",
        *[
            f"- {r['link']} Mbit/s / ms: measured RTT {r['measured_rtt_ms']} ms"
            for r in res["links"]
        ],
        "",
        "## Per step",
        "",
        "`shared`: fraction of v(n)'s uncompressed content in chunks v(n-1) has. `ideal`: the "
        "zstd size of the chunks v(n) has and v(n-1) lacks. `prefix`: zstd -3 --long of "
        "v(n)'s new layers with v(n-1)'s as prefix. casd time = `casctl sync` + `skopeo copy` "
        "from B's casd over loopback. `nodelta s`: the same with `casd serve --no-delta` on B. "
        "`land s`: after a sync where layers came as their compressed bytes (they serve from "
        "B's layer cache at once), the time B then took to store their tars for the next "
        "version's delta (casd.oci.landing), waited for before the next run and not in casd "
        "s. `thru s` (cold pulls): `skopeo copy` from an empty casd on B started with "
        "`--upstream A`, which syncs the image from casd A as skopeo asks for it and serves "
        "each layer as its bytes arrive.",
        "",
        "```",
        tab,
        "```",
        "",
        "## Against the targets",
        "",
        *[f"- {v}" for v in verdict],
        "",
        f"![chart]({png.name})",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny corpus, one link (CI smoke run)")
    p.add_argument("--links", default=None, help=f"comma-separated, from {', '.join(LINKS)}")
    p.add_argument("--series", nargs="*", help="series to run (default: all built)")
    p.add_argument("--kinds", default="real,converted")
    p.add_argument("--no-chunks-only", action="store_true", help="skip the --no-delta runs")
    p.add_argument(
        "--cold",
        default="100/50:9,1000/5:9,20/80:1",
        help="per link, for how many series the cold pull is measured (the rest start "
        "from v1 unmeasured); default: all on 100/50 and 1000/5, the first on 20/80",
    )
    p.add_argument("--no-prefix", action="store_true", help="skip the zstd --long prefix figure")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs of each step's sync with deltas allowed and with chunks only, whose "
        "medians the delta verdict compares (default: 3; 2 with --quick)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--work", type=Path, default=None, help="scratch directory")
    args = p.parse_args(argv)
    if os.geteuid() != 0 or (why := available()):
        print(
            f"bench/oci.py needs root and network namespaces: {why or 'not root'}", file=sys.stderr
        )
        return 2
    started = time.monotonic()
    env = environment()  # now: the commit whose code runs
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "casd", "protocol", "bench"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    env["uncommitted changes"] = "yes" if dirty else "none"
    env["casd-gogzip"] = gogzip_helper()
    # Byte-compiled, as `pip install` leaves an installed package: the README's editable
    # install does not, and where PYTHONDONTWRITEBYTECODE is set every casctl would
    # compile casd's modules again (about 0.15 s of each start, measured here).
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(REPO / "casd"), str(REPO / "protocol")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    corpus_dir = oci_corpus.DEFAULT_OUT / "quick" if args.quick else oci_corpus.DEFAULT_OUT
    names = ["quick-pystd"] if args.quick else (args.series or list(oci_corpus.SERIES_ORDER))
    log(f"corpus: {corpus_dir}")
    oci_corpus.build(corpus_dir, names, quick=args.quick, force=False)
    series = load_series(corpus_dir, names)
    links = (args.links or ("100/50" if args.quick else ",".join(LINKS))).split(",")
    kinds = args.kinds.split(",")
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"casd-bench-oci-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        log("ideal figures per step")
        share = shares(corpus_dir, series, prefix=not args.no_prefix)
        log("preparing the registry and casd A")
        prep = prepare(series, work)
        rows, steps = [], []
        for idx, link in enumerate(links):
            log(f"link {link}")
            cold = dict(x.split(":") for x in args.cold.split(","))
            row, got = run_link(
                link,
                idx,
                series,
                kinds,
                work,
                not args.no_chunks_only,
                int(cold.get(link, 9)),
                max(1, args.repeats or (2 if args.quick else 3)),
            )
            rows.append(row)
            steps += got
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    tab = table(steps, share)
    verdict = verdicts(steps, share)
    print(tab)
    print()
    print("\n".join(verdict))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = "-quick" if args.quick else ""
    json_path = args.out / f"oci-{stamp}{tag}.json"
    png = args.out / f"oci-{stamp}{tag}.png"
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": time.monotonic() - started,
        "json": str(json_path.relative_to(REPO))
        if json_path.is_relative_to(REPO)
        else str(json_path),
        "environment": env,
        "corpus": [{"name": s.name, "kind": s.kind_of_change, "tags": s.tags} for s in series],
        "links": rows,
        "prepare": prep,
        "shares": share,
        "steps": [asdict(st) for st in steps],
        "verdicts": verdict,
    }
    json_path.write_text(json.dumps(res, indent=1))
    chart(steps, png)
    # Only a whole run speaks for the project: a subset (or --quick) leaves RESULTS.md alone.
    whole = not (args.quick or args.links or args.series or args.kinds != "real,converted")
    if whole and args.out == HERE / "results":
        shutil.copy(png, HERE / "RESULTS.png")
        write_results_md(
            HERE / "RESULTS.md",
            res,
            tab,
            verdict,
            HERE / "RESULTS.png",
            ["python", "bench/oci.py", *(argv or sys.argv[1:])],
        )
    log(f"done in {(time.monotonic() - started) / 60:.1f} min: {json_path}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
