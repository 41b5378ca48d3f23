"""GC stress: garbage collection interleaved with pushes, tags and rm on a real casd.

Two parts, one data directory:

1. **Online** (``--seconds``): in-process clients (one connection each) push blobs of
   varied sizes (slices of real files that share chunks with each other, edited slices,
   random data, a few MB, empty), many under names, some unnamed and tagged right after
   (a race the grace period of 0 makes real), re-point and remove their names, and pull
   back their own named blobs while a collector calls ``gc`` with ``grace_s`` 0 and
   varied ``min_live`` back to back. Every name is written by one worker only, so the
   ledger of acknowledged operations says exactly what each name must hold. At the end:
   one more ``gc``, then every name is compared with the ledger, every named blob pulled
   and its sha256 checked, ``fsck --deep`` must be clean, and the store must hold exactly
   the named blobs and their chunks (nothing leaked, nothing lost).
2. **Kill during GC** (``--kill-trials``): the same workload; once a ``gc`` call is in
   flight, the daemon gets SIGKILL at a random moment within the time a gc takes. After a
   restart: each name holds its acknowledged value (or, with an operation in flight at
   the kill, the value before or after it), every named blob pulls and verifies, and
   ``fsck --deep`` is clean.

Prints its figures and exits 1 on any violation. ``tests/stress/test_gc_stress.py``
runs a short version. From the repository root::

    .venv/bin/python -m tests.stress.gc --seconds 120 --kill-trials 30
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make `tests` and `casd` importable from the root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio

from casd.chunking import DEFAULT_PARAMS, Chunker
from casd.client import Client, open_client
from casd.errors import CasdError, PeerRefused
from tests.integration.harness import BIN, Daemon, real_data
from tests.stress.crash import (
    OP_TIMEOUT,
    POOL_BYTES,
    Spec,
    _HashSink,
    build,
    casctl_async,
    choose_spec,
    digest_of,
)

NAMES_PER_WORKER = 4
SETTLE_TIMEOUT = 20.0


@dataclass
class Config:
    seconds: float = 120.0
    kill_trials: int = 30
    workers: int = 4
    seed: int | None = None
    workdir: Path | None = None
    keep: bool = False
    verbose: bool = True


@dataclass
class Figures:
    seed: int = 0
    workdir: str = ""
    pushes_acked: int = 0
    pushes_unnamed: int = 0
    tags_acked: int = 0
    tags_refused: int = 0  # tag of an unnamed blob gc had collected first (allowed)
    untags_acked: int = 0
    pulls_during: int = 0  # own named blobs pulled and verified while gc ran
    gc_runs: int = 0
    gc_blobs_deleted: int = 0
    gc_names_removed: int = 0
    gc_chunks_deleted: int = 0
    gc_chunks_leased: int = 0
    gc_bytes_freed: int = 0
    gc_packs_rewritten: int = 0
    gc_seconds_max: float = 0.0
    final_names: int = 0
    final_blobs: int = 0
    final_chunks: int = 0
    blobs_verified: int = 0
    fsck_runs: int = 0
    fsck_failures: int = 0
    kills: int = 0
    kills_during_gc: int = 0
    in_flight_at_kills: int = 0
    worker_errors: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations and not self.fsck_failures

    def summary(self) -> str:
        lines = [
            f"seed                 {self.seed}",
            f"pushes acknowledged  {self.pushes_acked} ({self.pushes_unnamed} unnamed, then "
            "tagged)",
            f"tags acknowledged    {self.tags_acked} ({self.tags_refused} refused: blob "
            "collected before the tag)",
            f"rm acknowledged      {self.untags_acked}",
            f"pulls during gc      {self.pulls_during} verified",
            f"gc runs              {self.gc_runs} (longest {self.gc_seconds_max:.2f} s)",
            f"gc deleted           {self.gc_blobs_deleted} blobs, {self.gc_chunks_deleted} "
            f"chunks ({self.gc_bytes_freed / 2**20:.1f} MiB), {self.gc_names_removed} names; "
            f"{self.gc_chunks_leased} chunks spared by leases",
            f"gc packs rewritten   {self.gc_packs_rewritten}",
            f"final store          {self.final_names} names, {self.final_blobs} blobs, "
            f"{self.final_chunks} chunks",
            f"blobs verified       {self.blobs_verified} pulls after checks",
            f"kills                {self.kills} ({self.kills_during_gc} with a gc in flight; "
            f"{self.in_flight_at_kills} other requests in flight)",
            "worker failures      "
            + (", ".join(f"{k} {v}" for k, v in self.worker_errors.most_common()) or "none")
            + " (after kills only)",
            f"fsck --deep          {self.fsck_runs} runs, {self.fsck_failures} not clean",
            f"violations           {len(self.violations)}",
            f"elapsed              {self.elapsed:.1f} s",
        ]
        lines += [f"  VIOLATION: {v}" for v in self.violations[:50]]
        return "\n".join(lines)


class Killed(Exception):
    pass


class Run:
    def __init__(self, config: Config, workdir: Path) -> None:
        self.config = config
        self.seed = (
            config.seed if config.seed is not None else random.SystemRandom().getrandbits(32)
        )
        self.rng = random.Random(self.seed)
        self.fig = Figures(seed=self.seed, workdir=str(workdir))
        self.daemon = Daemon(workdir / "data", workdir / "casd.log")
        self.pool = real_data(POOL_BYTES)
        self.names: dict[str, str] = {}  # the ledger: name -> digest, acknowledged
        # Per name, the operation in flight: (value before, value after) (None: absent).
        self.pending: dict[str, tuple[str | None, str | None]] = {}
        self.known: list[Spec] = []
        self.phase = ""
        self.gc_in_flight = False
        self.gc_started = trio.Event()
        self.killing = False
        self.last_gc_seconds = 0.0

    def violation(self, text: str) -> None:
        self.fig.violations.append(f"{self.phase}: {text}")
        if self.config.verbose:
            print(f"  VIOLATION: {text}", flush=True)

    def say(self, text: str) -> None:
        if self.config.verbose:
            print(text, flush=True)

    # --- workload ---------------------------------------------------------------------

    async def worker(self, wid: str, until: float) -> None:
        rng = random.Random(f"{self.seed}:{self.phase}:{wid}")
        own = [f"{wid}/{k}" for k in range(NAMES_PER_WORKER)]
        try:
            async with open_client(self.daemon.address) as client:
                chunker = Chunker(client.chunker_params or DEFAULT_PARAMS)
                while trio.current_time() < until:
                    with trio.fail_after(OP_TIMEOUT):
                        await self.one_op(client, chunker, rng, own)
                    await trio.sleep(rng.uniform(0, 0.02))
        except (CasdError, trio.TooSlowError, OSError) as exc:
            if self.killing:
                self.fig.worker_errors[type(exc).__name__] += 1
                return
            self.violation(f"{wid}: {type(exc).__name__}: {exc}")

    async def one_op(
        self, client: Client, chunker: Chunker, rng: random.Random, own: list[str]
    ) -> None:
        named = [n for n in own if n in self.names]
        r = rng.random()
        if r < 0.45 or not named:
            name = rng.choice(own)
            spec = choose_spec(rng, self.known)
            data = await trio.to_thread.run_sync(build, spec, self.pool)
            digest = digest_of(data)
            self.pending[name] = (self.names.get(name), digest)
            result = await client.push(chunker.cut(data), name=name)
            if result.digest != digest:
                self.violation(f"push of {name} acknowledged {result.digest}, data is {digest}")
            self.names[name] = digest
            del self.pending[name]
            self.known.append(spec)
            self.fig.pushes_acked += 1
        elif r < 0.6:
            # Unnamed, then tagged: with grace 0, gc may take the blob in between.
            name = rng.choice(own)
            spec = choose_spec(rng, self.known)
            data = await trio.to_thread.run_sync(build, spec, self.pool)
            digest = digest_of(data)
            await client.push(chunker.cut(data))
            self.fig.pushes_acked += 1
            self.fig.pushes_unnamed += 1
            self.pending[name] = (self.names.get(name), digest)
            try:
                await client.tag(name, digest)
            except PeerRefused as exc:
                if exc.code_name != "NOT_FOUND":
                    raise
                del self.pending[name]
                self.fig.tags_refused += 1
                return
            self.names[name] = digest
            del self.pending[name]
            self.fig.tags_acked += 1
        elif r < 0.72:
            name = rng.choice(own)
            digest = self.names[rng.choice(named)]
            self.pending[name] = (self.names.get(name), digest)
            await client.tag(name, digest)  # the blob is named: gc keeps it
            self.names[name] = digest
            del self.pending[name]
            self.fig.tags_acked += 1
        elif r < 0.85:
            name = rng.choice(named)
            self.pending[name] = (self.names[name], None)
            await client.untag(name)
            del self.names[name]
            del self.pending[name]
            self.fig.untags_acked += 1
        else:
            digest = self.names[rng.choice(named)]
            sink = _HashSink()
            await client.pull(digest, sink)  # type: ignore[arg-type]
            if "sha256:" + sink.sha.hexdigest() != digest:
                self.violation(f"pull of {digest} during gc gave other bytes")
            self.fig.pulls_during += 1

    async def collector(self, until: float, rng: random.Random) -> None:
        try:
            async with open_client(self.daemon.address) as client:
                while trio.current_time() < until:
                    args = {"grace_s": 0, "min_live": rng.choice([0.3, 0.5, 0.8, 1.0])}
                    self.gc_in_flight = True
                    self.gc_started.set()
                    start = time.monotonic()
                    with trio.fail_after(OP_TIMEOUT * 2):
                        report = await client.call("gc", args)
                    self.gc_in_flight = False
                    self.tally(report, time.monotonic() - start)
                    await trio.sleep(rng.uniform(0, 0.05))
        except (CasdError, trio.TooSlowError, OSError) as exc:
            if self.killing:
                return
            self.violation(f"gc failed: {type(exc).__name__}: {exc}")

    def tally(self, report: dict[str, Any], seconds: float) -> None:
        f = self.fig
        f.gc_runs += 1
        f.gc_blobs_deleted += int(report["blobs_deleted"])
        f.gc_names_removed += int(report["names_removed"])
        f.gc_chunks_deleted += int(report["chunks_deleted"])
        f.gc_chunks_leased += int(report["chunks_leased"])
        f.gc_bytes_freed += int(report["bytes_freed"])
        f.gc_packs_rewritten += int(report["packs_rewritten"])
        f.gc_seconds_max = max(f.gc_seconds_max, seconds)
        self.last_gc_seconds = seconds

    async def workload(self, seconds: float) -> None:
        until = trio.current_time() + seconds
        async with trio.open_nursery() as nursery:
            for i in range(self.config.workers):
                nursery.start_soon(self.worker, f"w{i}", until)
            nursery.start_soon(self.collector, until, random.Random(f"{self.seed}:gc"))

    # --- checks -------------------------------------------------------------------------

    async def check(self, *, exact: bool) -> None:
        """Names against the ledger, every named blob pulled and hashed, fsck --deep.
        With ``exact``, also that the store holds only the named blobs and their chunks."""
        async with open_client(self.daemon.address) as client:
            if exact:
                report = await client.call("gc", {"grace_s": 0, "min_live": 0.5})
                self.tally(report, float(report["seconds"]))
            observed = dict(await client.list_names())
            for name in sorted(set(observed) | set(self.names) | set(self.pending)):
                got = observed.get(name)
                allowed = {self.names.get(name)}
                if name in self.pending:
                    allowed |= set(self.pending[name])
                if got not in allowed:
                    self.violation(f"name {name} holds {got}, allowed {sorted(map(str, allowed))}")
            self.pending.clear()
            self.names = dict(observed)
            digests = sorted(set(observed.values()))
            limit = trio.CapacityLimiter(4)

            async def pull(d: str) -> None:
                sink = _HashSink()
                async with limit:
                    try:
                        with trio.fail_after(OP_TIMEOUT):
                            await client.pull(d, sink)  # type: ignore[arg-type]
                    except (CasdError, trio.TooSlowError) as exc:
                        self.violation(f"named blob {d} does not pull: {exc}")
                        return
                if "sha256:" + sink.sha.hexdigest() != d:
                    self.violation(f"named blob {d} pulls as other bytes")
                else:
                    self.fig.blobs_verified += 1

            async with trio.open_nursery() as nursery:
                for d in digests:
                    nursery.start_soon(pull, d)
            if exact:
                chunks: set[bytes] = set()
                for d in digests:
                    chunks.update((await client.fetch_recipe(d)).ids)
                stats = await client.stats()
                self.fig.final_names = len(observed)
                self.fig.final_blobs = int(stats["store_blobs"])
                self.fig.final_chunks = int(stats["store_chunks"])
                if self.fig.final_blobs != len(digests):
                    self.violation(
                        f"after gc the store holds {self.fig.final_blobs} blobs, the names "
                        f"{len(digests)}"
                    )
                if self.fig.final_chunks != len(chunks):
                    self.violation(
                        f"after gc the store holds {self.fig.final_chunks} chunks, the named "
                        f"blobs use {len(chunks)}"
                    )
        p = await casctl_async(self.daemon.address, "fsck", "--deep", "--json")
        self.fig.fsck_runs += 1
        try:
            fsck = json.loads(p.stdout)
        except ValueError:
            fsck = {}
        if p.returncode != 0 or not fsck.get("clean"):
            self.fig.fsck_failures += 1
            self.violation(f"fsck --deep not clean (exit {p.returncode}): {fsck or p.stderr!r}")

    # --- the two parts --------------------------------------------------------------------

    async def online(self) -> None:
        self.phase = "online"
        self.say(f"online: {self.config.workers} workers and gc for {self.config.seconds:.0f} s")
        await self.workload(self.config.seconds)
        await self.check(exact=True)
        self.say(
            f"online: {self.fig.gc_runs} gc runs, {self.fig.pushes_acked} pushes; store "
            f"{self.fig.final_names} names {self.fig.final_blobs} blobs "
            f"{self.fig.final_chunks} chunks"
        )

    async def kill_trial(self, t: int) -> None:
        self.phase = f"kill trial {t}"
        self.killing = False
        self.gc_started = trio.Event()
        self.gc_in_flight = False
        in_gc = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.workload, 3600.0)
            await self.gc_started.wait()
            await trio.sleep(self.rng.uniform(0.05, 0.4))  # let some gc runs complete
            # Wait for the next gc to start, then kill within the time one usually takes.
            self.gc_started = trio.Event()
            with trio.move_on_after(10):
                await self.gc_started.wait()
            await trio.sleep(self.rng.uniform(0, max(self.last_gc_seconds, 0.005)))
            self.killing = True
            in_gc = self.gc_in_flight
            await trio.to_thread.run_sync(self.daemon.kill)
            self.fig.kills += 1
            self.fig.kills_during_gc += in_gc
            self.fig.in_flight_at_kills += len(self.pending)
            # Every worker must fail promptly on its own; a hang is a violation.
            nursery.cancel_scope.deadline = trio.current_time() + SETTLE_TIMEOUT
        if nursery.cancel_scope.cancelled_caught:
            self.violation(f"workers still running {SETTLE_TIMEOUT:.0f}s after the kill")
        await trio.to_thread.run_sync(self.daemon.start)
        self.killing = False
        before = len(self.fig.violations)
        await self.check(exact=False)
        self.say(
            f"trial {t:3d}: killed {'during gc' if in_gc else 'between gc runs'}; "
            f"{len(self.names)} names verified"
            + ("" if len(self.fig.violations) == before else ", VIOLATIONS")
        )

    async def main(self) -> None:
        await trio.to_thread.run_sync(self.daemon.start)
        if self.config.seconds > 0:
            await self.online()
        for t in range(1, self.config.kill_trials + 1):
            await self.kill_trial(t)
        self.phase = "end"
        code = await trio.to_thread.run_sync(self.daemon.stop)
        if code != 0:
            self.violation(f"casd exited {code} on SIGTERM")
        p = await trio.run_process(
            [str(BIN / "casd"), "fsck", "--deep", "--data", str(self.daemon.data)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        self.fig.fsck_runs += 1
        if p.returncode != 0:
            self.fig.fsck_failures += 1
            self.violation(f"offline casd fsck --deep failed: {p.stdout!r} {p.stderr!r}")
        log = self.daemon.log.read_text(errors="replace")
        if "Traceback" in log:
            self.violation(f"the daemon logged {log.count('Traceback')} tracebacks")


def run(config: Config) -> Figures:
    made = config.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="casd-gc-")) if made else Path(config.workdir)  # type: ignore[arg-type]
    workdir.mkdir(parents=True, exist_ok=True)
    r = Run(config, workdir)
    r.say(f"casd gc stress: seed {r.seed}, store in {workdir}/data")
    start = time.monotonic()
    try:
        trio.run(r.main)
    finally:
        r.daemon.kill()
        r.fig.elapsed = time.monotonic() - start
    if made and r.fig.ok and not config.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return r.fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=120, help="online part, seconds")
    p.add_argument("--kill-trials", type=int, default=30, help="SIGKILLs during gc")
    p.add_argument("--workers", type=int, default=4, help="client workers")
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    p.add_argument("--workdir", type=Path, help="where the store and log go (kept)")
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    fig = run(
        Config(
            seconds=args.seconds,
            kill_trials=args.kill_trials,
            workers=args.workers,
            seed=args.seed,
            workdir=args.workdir,
            keep=args.keep,
            verbose=not args.quiet,
        )
    )
    print(fig.summary())
    if not fig.ok:
        print(f"FAILED; store and daemon log kept in {fig.workdir}", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
