"""Crash-consistency stress: SIGKILL a busy casd at random moments, restart it, verify.

One data directory serves the whole run. Each trial:

1. Workers drive the running daemon concurrently: in-process clients (``open_client``,
   one connection each) and one ``casctl`` subprocess worker push blobs of varied sizes
   (empty, tiny, slices of real files that share chunks with earlier blobs, edited
   slices, fresh random data, a few MB), tag names and remove them (``rm``). A ledger
   records only what the daemon acknowledged: a push once PUSH_DONE / ``casctl put``
   returned, a tag or rm once it returned OK.
2. After a random delay the daemon gets SIGKILL. Every worker must then fail promptly
   with a casd error (a ``casctl`` one-line error, exit status 1); nothing may hang.
3. The daemon restarts on the same directory and the store is checked:

   - ``casctl fsck --deep --json`` exits 0 and reports the store clean;
   - every acknowledged blob exists with its size, and is pulled and its bytes' sha256
     compared with its digest (this trial's blobs and a sample of older ones; all of
     them at the end of the run; fsck --deep re-hashes every blob server-side anyway);
   - every name in ``casctl ls`` points to an existing blob and holds a value that the
     acknowledged operations allow (linearizability of a register: an operation in
     flight at the kill may or may not have applied);
   - the store holds no blob other than acknowledged ones and in-flight pushes, and an
     in-flight push that did commit verifies;
   - one push that was in flight at the kill is re-run and completes.

Prints figures per run and exits 1 on any violation. ``tests/stress/test_crash.py``
runs a short version. Run from the repository root::

    .venv/bin/python tests/stress/crash.py --trials 100 --seed 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import subprocess
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

# Real file bytes that slices are cut from: blobs cut from overlapping ranges share chunks.
POOL_BYTES = 12 * 1024 * 1024

# Every operation, and the whole workload after the kill, is bounded: a hang is a failure.
OP_TIMEOUT = 60.0
SETTLE_TIMEOUT = 20.0  # after SIGKILL, every worker must have failed within this
CASCTL_TIMEOUT = 120.0  # fsck --deep of the whole store included

NAMES_PER_WORKER = 4
SHARED_NAMES = 3  # names every worker writes: concurrent tags on one name


# --- blob contents, regenerated from a small spec ---------------------------------------


@dataclass(frozen=True, slots=True)
class Spec:
    """How to rebuild a blob's bytes: the ledger keeps this, not the bytes."""

    kind: str  # "empty" | "rand" (seeded random bytes) | "slice" (of the real-file pool)
    seed: int = 0
    offset: int = 0
    length: int = 0
    edits: int = 0  # small overwrites in a slice: each makes a chunk or two new

    def label(self) -> str:
        if self.kind == "empty":
            return "empty"
        extra = f"+{self.edits}e" if self.edits else ""
        return f"{self.kind}{extra}:{self.length}"


def build(spec: Spec, pool: bytes) -> bytes:
    if spec.kind == "empty":
        return b""
    rng = random.Random(spec.seed)
    if spec.kind == "rand":
        return rng.randbytes(spec.length)
    data = bytearray(pool[spec.offset : spec.offset + spec.length])
    for _ in range(spec.edits):
        n = rng.randint(1, 64)
        at = rng.randrange(max(1, len(data) - n))
        data[at : at + n] = rng.randbytes(n)
    return bytes(data)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def choose_spec(rng: random.Random, known: list[Spec]) -> Spec:
    r = rng.random()
    if r < 0.04:
        return Spec("empty")
    if r < 0.22:  # tiny: one chunk, smaller than the chunker's minimum
        return Spec("rand", rng.getrandbits(64), length=rng.randint(1, 8192))
    if r < 0.52:  # a slice of real files, sharing chunks with earlier slices
        length = log_uniform(rng, 16 * 1024, 768 * 1024)
        offset = rng.randrange(POOL_BYTES - length)
        return Spec("slice", rng.getrandbits(64), offset, length, rng.choice((0, 0, 1, 2)))
    if r < 0.62 and known:  # the same content again: nothing new to send
        return rng.choice(known)
    if r < 0.92:  # fresh random data: every chunk travels and is stored
        return Spec("rand", rng.getrandbits(64), length=log_uniform(rng, 32 * 1024, 1024 * 1024))
    length = rng.randint(2 * 1024 * 1024, 5 * 1024 * 1024)  # a few MB
    if rng.random() < 0.5:
        return Spec("rand", rng.getrandbits(64), length=length)
    offset = rng.randrange(POOL_BYTES - length)
    return Spec("slice", rng.getrandbits(64), offset, length, rng.randint(0, 3))


# --- the ledger ----------------------------------------------------------------------------


@dataclass(slots=True)
class Blob:
    digest: str
    size: int
    spec: Spec


@dataclass(slots=True)
class Op:
    """One request a worker made. ``end`` is when it was acknowledged (or failed)."""

    kind: str  # "push" | "tag" | "untag"
    worker: str
    name: str | None
    digest: str | None  # push: the blob's digest (known before sending); tag: the target
    spec: Spec | None
    start: float
    end: float = math.inf
    status: str = "pending"  # "acked" | "refused" | "failed" (no answer: maybe applied)
    detail: str = ""
    chunks: int = 0

    @property
    def value(self) -> str | None:
        """What the name holds once this operation applied."""
        return None if self.kind == "untag" else self.digest

    def describe(self) -> str:
        what = {
            "push": f"push {self.spec.label() if self.spec else '?'} {short(self.digest)}",
            "tag": f"tag -> {short(self.digest)}",
            "untag": "rm",
        }[self.kind]
        name = f" as {self.name}" if self.name and self.kind == "push" else ""
        return f"{self.worker}: {what}{name} [{self.status}]"


def short(digest: str | None) -> str:
    return digest[7:19] if digest else "-"


@dataclass
class Ledger:
    """What the run knows for sure: blobs the daemon acknowledged (or that an in-flight
    push committed and that verified), and the names as verified after the last restart."""

    blobs: dict[str, Blob] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    def add(self, digest: str, size: int, spec: Spec) -> None:
        self.blobs.setdefault(digest, Blob(digest, size, spec))


def name_candidates(initial: str | None, ops: list[Op]) -> set[str | None]:
    """The values a name may hold after ``ops`` (all on that name), from ``initial``.

    A register's final value comes from the write that linearizes last. Acknowledged
    writes all applied; a write in flight at the kill may or may not have. A write can be
    last unless an acknowledged write started after it was acknowledged.
    """
    writes = [op for op in ops if op.status in ("acked", "failed")]
    acked = [op for op in writes if op.status == "acked"]
    latest_start = max((op.start for op in acked), default=-math.inf)
    out: set[str | None] = set() if acked else {initial}
    for op in writes:
        end = op.end if op.status == "acked" else math.inf
        if latest_start <= end:
            out.add(op.value)
    return out


# --- configuration and figures ---------------------------------------------------------------


@dataclass
class Config:
    trials: int = 100
    seed: int | None = None
    workers: int = 3  # in-process client workers
    cli_workers: int = 1  # casctl subprocess workers
    min_delay: float = 0.05
    max_delay: float = 1.5
    sample: int = 24  # older blobs pulled and verified per trial (all at the end)
    workdir: Path | None = None  # default: a temporary directory, removed when clean
    keep: bool = False
    verbose: bool = True


@dataclass
class Figures:
    trials: int = 0
    kills: int = 0
    pushes_acked: int = 0
    tags_acked: int = 0
    untags_acked: int = 0
    in_flight: int = 0  # requests unanswered at a kill
    in_flight_pushes: int = 0
    in_flight_committed: int = 0  # new blobs those pushes committed before the ack was lost
    reruns: int = 0
    rerun_chunks_sent: int = 0
    rerun_chunks: int = 0
    blobs_verified: int = 0  # pulls whose bytes' sha256 matched
    blobs_in_store: int = 0
    losses: int = 0
    fsck_failures: int = 0
    worker_errors: int = 0  # clear failures after a kill, as expected
    error_kinds: Counter[str] = field(default_factory=Counter)
    trials_without_inflight_push: int = 0
    violations: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    seed: int = 0
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations and not self.losses and not self.fsck_failures

    def summary(self) -> str:
        lines = [
            f"seed                 {self.seed}",
            f"trials               {self.trials}",
            f"kills                {self.kills}",
            f"acknowledged pushes  {self.pushes_acked} (+{self.reruns} re-runs)",
            f"acknowledged tags    {self.tags_acked}, rm {self.untags_acked}",
            f"in flight at kills   {self.in_flight} requests, {self.in_flight_pushes} pushes "
            f"({self.in_flight_committed} new blobs committed, ack lost; all verified)",
            f"re-run pushes        {self.reruns} completed, sent {self.rerun_chunks_sent} of "
            f"{self.rerun_chunks} chunks ({self.trials_without_inflight_push} trials had no "
            "push in flight)",
            f"blobs verified       {self.blobs_verified} pulls ({self.blobs_in_store} distinct "
            "blobs in the store at the end)",
            f"worker failures      {self.worker_errors} after kills, all clear casd errors ("
            + ", ".join(f"{k} {v}" for k, v in self.error_kinds.most_common())
            + ")",
            f"losses               {self.losses}",
            f"fsck failures        {self.fsck_failures}",
            f"violations           {len(self.violations)}",
            f"elapsed              {self.elapsed:.1f} s",
        ]
        lines += [f"  VIOLATION: {v}" for v in self.violations[:50]]
        return "\n".join(lines)


class Fatal(Exception):
    """The run cannot go on (the daemon will not restart)."""


# --- one run ---------------------------------------------------------------------------------


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
        self.ledger = Ledger()
        self.trial = 0

    def violation(self, text: str) -> None:
        self.fig.violations.append(f"trial {self.trial}: {text}")
        if self.config.verbose:
            print(f"  VIOLATION: {text}", flush=True)

    def say(self, text: str) -> None:
        if self.config.verbose:
            print(text, flush=True)

    async def main(self) -> None:
        await trio.to_thread.run_sync(self.daemon.start)
        for t in range(1, self.config.trials + 1):
            self.trial = t
            try:
                await self.one_trial()
            except Fatal:
                raise
            except Exception as exc:
                self.violation(f"the trial crashed: {type(exc).__name__}: {exc!r}")
                raise Fatal(str(exc)) from exc
            self.fig.trials = t
        self.trial = 0
        await self.final_check()

    # --- workload ------------------------------------------------------------------------

    async def one_trial(self) -> None:
        delay = self.rng.uniform(self.config.min_delay, self.config.max_delay)
        ops: list[Op] = []
        acked_now: list[Blob] = []  # this trial's acknowledged pushes, shared by workers
        errors: list[tuple[str, float, BaseException | str]] = []  # worker, when, what
        running: set[str] = set()
        address = self.daemon.address
        kill_time = math.inf

        async with trio.open_nursery() as outer:
            done = trio.Event()

            async def workers() -> None:
                async with trio.open_nursery() as inner:
                    for i in range(self.config.workers):
                        wid = f"w{i}"
                        running.add(wid)
                        inner.start_soon(
                            self.client_worker, wid, address, ops, acked_now, errors, running
                        )
                    for i in range(self.config.cli_workers):
                        wid = f"c{i}"
                        running.add(wid)
                        inner.start_soon(
                            self.cli_worker, wid, address, ops, acked_now, errors, running
                        )
                done.set()

            outer.start_soon(workers)
            await trio.sleep(delay)
            kill_time = time.monotonic()
            await trio.to_thread.run_sync(self.daemon.kill)
            self.fig.kills += 1
            with trio.move_on_after(SETTLE_TIMEOUT):
                await done.wait()
            if not done.is_set():
                self.violation(
                    f"workers {sorted(running)} still running {SETTLE_TIMEOUT:.0f}s after the "
                    "kill (a request hangs on a dead daemon)"
                )
                outer.cancel_scope.cancel()

        self.classify(ops, errors, kill_time)
        try:
            await trio.to_thread.run_sync(self.daemon.start)
        except RuntimeError as exc:
            self.violation(f"the daemon does not restart after SIGKILL: {exc}")
            raise Fatal(str(exc)) from exc
        await self.verify(ops, acked_now, delay)

    async def client_worker(
        self,
        wid: str,
        address: str,
        ops: list[Op],
        acked_now: list[Blob],
        errors: list[tuple[str, float, BaseException | str]],
        running: set[str],
    ) -> None:
        rng = random.Random(f"{self.seed}:{self.trial}:{wid}")
        own = [f"{wid}/{k}" for k in range(NAMES_PER_WORKER)]
        view = {n: self.ledger.names.get(n) for n in own}  # exact: only this worker writes them
        op: Op | None = None
        try:
            async with open_client(address) as client:
                chunker = Chunker(client.chunker_params or DEFAULT_PARAMS)
                while True:
                    op, data = await self.next_op(rng, wid, own, view, acked_now)
                    ops.append(op)
                    with trio.fail_after(OP_TIMEOUT):
                        await self.client_op(client, chunker, op, data)
                    self.acked(op, view, acked_now)
                    op = None
                    await trio.sleep(rng.uniform(0, 0.03))
        except Exception as exc:
            now = time.monotonic()
            if op is not None and op.status == "pending":
                op.status, op.end, op.detail = "failed", now, f"{type(exc).__name__}: {exc}"
            errors.append((wid, now, exc))
        finally:
            running.discard(wid)

    async def client_op(self, client: Client, chunker: Chunker, op: Op, data: bytes) -> None:
        if op.kind == "push":
            result = await client.push(chunker.cut(data), name=op.name)
            if result.digest != op.digest:
                raise AssertionError(f"PUSH_DONE says {result.digest}, the data is {op.digest}")
            op.chunks = result.chunks
        elif op.kind == "tag":
            assert op.name is not None
            assert op.digest is not None
            await client.tag(op.name, op.digest)
        else:
            assert op.name is not None
            try:
                await client.untag(op.name)
            except PeerRefused as exc:
                if exc.code_name != "NOT_FOUND" or not op.name.startswith("shared/"):
                    raise
                # Absent at that moment: a read, not a write.
                op.status, op.end, op.detail = "refused", time.monotonic(), "NOT_FOUND"

    async def cli_worker(
        self,
        wid: str,
        address: str,
        ops: list[Op],
        acked_now: list[Blob],
        errors: list[tuple[str, float, BaseException | str]],
        running: set[str],
    ) -> None:
        rng = random.Random(f"{self.seed}:{self.trial}:{wid}")
        own = [f"{wid}/{k}" for k in range(NAMES_PER_WORKER)]
        view = {n: self.ledger.names.get(n) for n in own}
        casctl = [str(BIN / "casctl"), "--server", address, "-q"]
        try:
            while True:
                op, data = await self.next_op(rng, wid, own, view, acked_now)
                ops.append(op)
                if op.kind == "push":
                    cmd = [*casctl, "put", "-", "--json"]
                    if op.name:
                        cmd += ["--name", op.name]
                elif op.kind == "tag":
                    assert op.name
                    assert op.digest
                    cmd = [*casctl, "tag", op.name, op.digest]
                else:
                    assert op.name
                    cmd = [*casctl, "rm", op.name]
                try:
                    with trio.fail_after(OP_TIMEOUT):
                        p = await trio.run_process(
                            cmd, stdin=data, capture_stdout=True, capture_stderr=True, check=False
                        )
                except trio.TooSlowError:
                    op.status, op.end, op.detail = "failed", time.monotonic(), "timed out"
                    errors.append((wid, op.end, f"casctl {op.kind} hung for {OP_TIMEOUT:.0f}s"))
                    return
                err = p.stderr.decode(errors="replace").strip()
                if p.returncode == 0:
                    if op.kind == "push":
                        out = json.loads(p.stdout)
                        if out["digest"] != op.digest:
                            op.status, op.end = "failed", time.monotonic()
                            errors.append((wid, op.end, f"casctl put said {out['digest']}"))
                            return
                        op.chunks = int(out["chunks"])
                    self.acked(op, view, acked_now)
                    continue
                if op.kind == "untag" and op.name.startswith("shared/") and "(NOT_FOUND)" in err:
                    op.status, op.end, op.detail = "refused", time.monotonic(), "NOT_FOUND"
                    continue
                op.status, op.end, op.detail = "failed", time.monotonic(), err
                clear = p.returncode == 1 and err.startswith("casctl: error: ")
                errors.append((wid, op.end, err if clear else f"exit {p.returncode}: {err!r}"))
                return
        except Exception as exc:  # a bug here, or casctl printed something unexpected
            errors.append((wid, time.monotonic(), exc))
        finally:
            running.discard(wid)

    async def next_op(
        self,
        rng: random.Random,
        wid: str,
        own: list[str],
        view: dict[str, str | None],
        acked_now: list[Blob],
    ) -> tuple[Op, bytes]:
        """The next request, and the blob's bytes when it is a push."""
        known = [b.spec for b in self.ledger.blobs.values()] + [b.spec for b in acked_now]
        digests = list(self.ledger.blobs) + [b.digest for b in acked_now]
        shared = [f"shared/{k}" for k in range(SHARED_NAMES)]
        r = rng.random()
        present = [n for n in own if view[n] is not None]
        if r < 0.6 or not digests:
            spec = choose_spec(rng, known)
            data = await trio.to_thread.run_sync(build, spec, self.pool)
            q = rng.random()
            name = rng.choice(own) if q < 0.5 else rng.choice(shared) if q < 0.7 else None
            return Op("push", wid, name, digest_of(data), spec, time.monotonic()), data
        if r < 0.82 or not present:
            name = rng.choice(own) if rng.random() < 0.7 else rng.choice(shared)
            return Op("tag", wid, name, rng.choice(digests), None, time.monotonic()), b""
        name = rng.choice(present) if rng.random() < 0.7 else rng.choice(shared)
        return Op("untag", wid, name, None, None, time.monotonic()), b""

    def acked(self, op: Op, view: dict[str, str | None], acked_now: list[Blob]) -> None:
        if op.status == "refused":
            return
        op.status, op.end = "acked", time.monotonic()
        if op.kind == "push":
            assert op.digest is not None
            assert op.spec is not None
            acked_now.append(Blob(op.digest, op.spec.length, op.spec))
        if op.name in view:
            view[op.name] = op.value

    def classify(
        self,
        ops: list[Op],
        errors: list[tuple[str, float, BaseException | str]],
        kill_time: float,
    ) -> None:
        for wid, when, what in errors:
            text = what if isinstance(what, str) else f"{type(what).__name__}: {what}"
            if when < kill_time:
                self.violation(f"{wid} failed before the kill: {text}")
            elif isinstance(what, str):
                if what.startswith("casctl: error: "):
                    self.fig.worker_errors += 1
                    self.fig.error_kinds["casctl exit 1"] += 1
                else:
                    self.violation(f"{wid}: unclear failure after the kill: {text}")
            elif isinstance(what, CasdError) and str(what):
                self.fig.worker_errors += 1
                self.fig.error_kinds[type(what).__name__] += 1
            else:
                self.violation(f"{wid}: unclear failure after the kill: {text}")
        for op in ops:
            if op.status == "acked":
                if op.kind == "push":
                    self.fig.pushes_acked += 1
                elif op.kind == "tag":
                    self.fig.tags_acked += 1
                else:
                    self.fig.untags_acked += 1
            elif op.status == "failed":
                self.fig.in_flight += 1
                self.fig.in_flight_pushes += op.kind == "push"

    # --- verification --------------------------------------------------------------------

    async def verify(self, ops: list[Op], acked_now: list[Blob], delay: float) -> None:
        addr = self.daemon.address
        inflight = [op for op in ops if op.kind == "push" and op.status == "failed"]
        losses_before = self.fig.losses
        verified_before = self.fig.blobs_verified
        fsck: dict[str, Any] = {}
        names: dict[str, str] = {}

        async def run_fsck() -> None:
            nonlocal fsck
            p = await casctl_async(addr, "fsck", "--deep", "--json")
            try:
                fsck = json.loads(p.stdout)
            except ValueError:
                fsck = {}
            if p.returncode != 0 or not fsck.get("clean"):
                self.fig.fsck_failures += 1
                if damaged := fsck.pop("damaged", None):
                    fsck["damaged"] = f"{len(damaged)} chunks, first {damaged[0]}"
                self.violation(f"fsck --deep not clean (exit {p.returncode}): {fsck or p.stderr!r}")

        async def run_ls() -> None:
            p = await casctl_async(addr, "ls", "--json")
            if p.returncode != 0:
                self.violation(f"casctl ls failed: {p.stderr!r}")
                return
            names.update((e["name"], e["digest"]) for e in json.loads(p.stdout))

        async with open_client(addr) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_fsck)
                nursery.start_soon(run_ls)

                # Every acknowledged blob, ever: it exists with its size.
                for b in acked_now:
                    self.ledger.add(b.digest, b.size, b.spec)
                present = await self.stat_all(client, list(self.ledger.blobs))
                for digest, size in present.items():
                    want = self.ledger.blobs[digest].size
                    if size is None:
                        self.fig.losses += 1
                        self.violation(f"acknowledged blob {digest} is gone after the kill")
                    elif size != want:
                        self.fig.losses += 1
                        self.violation(f"acknowledged blob {digest} has size {size}, not {want}")

                # In-flight pushes: absent, or complete and verifying.
                maybe = await self.stat_all(client, [op.digest for op in inflight if op.digest])
                committed = {
                    op.digest: op
                    for op in inflight
                    if op.digest and maybe.get(op.digest) is not None
                }
                newly = [d for d in committed if d not in self.ledger.blobs]

                # Pull and hash: this trial's blobs, committed in-flight ones, a sample.
                older = [d for d in self.ledger.blobs if d not in {b.digest for b in acked_now}]
                sample = self.rng.sample(older, min(self.config.sample, len(older)))
                targets = {b.digest for b in acked_now} | set(committed) | set(sample)
                bad = await self.pull_verify(client, sorted(targets))
                for digest, why in bad.items():
                    if digest in self.ledger.blobs:
                        self.fig.losses += 1
                        self.violation(f"acknowledged blob {digest} does not verify: {why}")
                    else:
                        self.violation(f"in-flight push committed a bad blob {digest}: {why}")
                for d in newly:
                    if d not in bad:
                        op = committed[d]
                        assert op.spec is not None
                        self.ledger.add(d, op.spec.length, op.spec)
                        self.fig.in_flight_committed += 1

                stats = await client.stats()

            # Nothing but known blobs: every known one exists (checked), so count the rest.
            stored = int(stats["store_blobs"])
            if stored != len(self.ledger.blobs):
                self.violation(
                    f"the store holds {stored} blobs; acknowledged and committed in-flight "
                    f"pushes account for {len(self.ledger.blobs)}"
                )

            self.check_names(names, ops)
            await self.rerun(client, inflight, committed)

        self.say(
            f"trial {self.trial:3d}: kill at {delay:.2f}s; acked "
            f"{sum(o.status == 'acked' for o in ops)}, in flight "
            f"{sum(o.status == 'failed' for o in ops)} ({len(inflight)} pushes, "
            f"{len(newly)} new blobs committed unacknowledged); verified "
            f"{self.fig.blobs_verified - verified_before}, store {stored} blobs "
            f"{len(names)} names, fsck {'clean' if fsck.get('clean') else 'NOT CLEAN'}"
            + (
                f", {self.fig.losses - losses_before} LOST"
                if self.fig.losses > losses_before
                else ""
            )
        )

    def check_names(self, names: dict[str, str], ops: list[Op]) -> None:
        by_name: dict[str, list[Op]] = {}
        for op in ops:
            if op.name is not None:
                by_name.setdefault(op.name, []).append(op)
        for name in sorted(set(names) | set(by_name) | set(self.ledger.names)):
            observed = names.get(name)
            if observed is not None and observed not in self.ledger.blobs:
                self.violation(f"name {name} points to {observed}, which is no known blob")
            allowed = name_candidates(self.ledger.names.get(name), by_name.get(name, []))
            if observed not in allowed:
                history = "; ".join(op.describe() for op in by_name.get(name, []))
                self.violation(
                    f"name {name} holds {short(observed)}, allowed "
                    f"{sorted(short(a) for a in allowed)} (was "
                    f"{short(self.ledger.names.get(name))}; {history})"
                )
        self.ledger.names = dict(names)

    async def rerun(self, client: Client, inflight: list[Op], committed: dict[str, Op]) -> None:
        """Re-run one push that was in flight at the kill (preferably one that did not
        commit): it must complete, and verify."""
        if not inflight:
            self.fig.trials_without_inflight_push += 1
            return
        pending = [op for op in inflight if op.digest not in committed]
        op = self.rng.choice(pending or inflight)
        assert op.spec is not None
        assert op.digest is not None
        data = await trio.to_thread.run_sync(build, op.spec, self.pool)
        chunker = Chunker(client.chunker_params or DEFAULT_PARAMS)
        try:
            with trio.fail_after(OP_TIMEOUT):
                result = await client.push(chunker.cut(data), name=op.name)
        except (CasdError, trio.TooSlowError) as exc:
            self.violation(f"re-run of {op.describe()} failed: {type(exc).__name__}: {exc}")
            return
        if result.digest != op.digest:
            self.violation(f"re-run of {op.describe()} committed {result.digest}")
            return
        self.fig.reruns += 1
        self.fig.rerun_chunks += result.chunks
        self.fig.rerun_chunks_sent += result.chunks_transferred
        self.ledger.add(op.digest, len(data), op.spec)
        if op.name is not None:
            self.ledger.names[op.name] = op.digest
        bad = await self.pull_verify(client, [op.digest])
        for digest, why in bad.items():
            self.violation(f"re-run blob {digest} does not verify: {why}")

    async def stat_all(self, client: Client, digests: list[str]) -> dict[str, int | None]:
        """Size of each blob, None when the server does not have it."""
        out: dict[str, int | None] = {}
        limit = trio.CapacityLimiter(16)

        async def one(d: str) -> None:
            async with limit:
                try:
                    with trio.fail_after(OP_TIMEOUT):
                        out[d] = (await client.stat(d)).size
                except PeerRefused as exc:
                    if exc.code_name != "NOT_FOUND":
                        raise
                    out[d] = None

        async with trio.open_nursery() as nursery:
            for d in dict.fromkeys(digests):
                nursery.start_soon(one, d)
        return out

    async def pull_verify(self, client: Client, digests: list[str]) -> dict[str, str]:
        """Pull each blob and hash its bytes; returns what failed and why."""
        bad: dict[str, str] = {}
        limit = trio.CapacityLimiter(4)

        async def one(d: str) -> None:
            sink = _HashSink()
            async with limit:
                try:
                    with trio.fail_after(OP_TIMEOUT):
                        await client.pull(d, sink)  # type: ignore[arg-type]
                except (CasdError, trio.TooSlowError) as exc:
                    bad[d] = f"{type(exc).__name__}: {exc}"
                    return
            actual = "sha256:" + sink.sha.hexdigest()
            if actual != d:
                bad[d] = f"its bytes hash to {actual}"
            elif d in self.ledger.blobs and sink.size != self.ledger.blobs[d].size:
                bad[d] = f"{sink.size} bytes, not {self.ledger.blobs[d].size}"
            else:
                self.fig.blobs_verified += 1

        async with trio.open_nursery() as nursery:
            for d in digests:
                nursery.start_soon(one, d)
        return bad

    async def final_check(self) -> None:
        """Every blob ever acknowledged, pulled and hashed; then a graceful stop and an
        offline deep fsck of the directory."""
        async with open_client(self.daemon.address) as client:
            bad = await self.pull_verify(client, list(self.ledger.blobs))
            stats = await client.stats()
        for digest, why in bad.items():
            self.fig.losses += 1
            self.violation(f"final check: blob {digest} does not verify: {why}")
        self.fig.blobs_in_store = int(stats["store_blobs"])
        code = await trio.to_thread.run_sync(self.daemon.stop)
        if code != 0:
            self.violation(f"casd exited {code} on SIGTERM")
        p = await trio.run_process(
            [str(BIN / "casd"), "fsck", "--deep", "--data", str(self.daemon.data)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        if p.returncode != 0:
            self.fig.fsck_failures += 1
            self.violation(f"offline casd fsck --deep failed: {p.stdout!r} {p.stderr!r}")
        log = self.daemon.log.read_text(errors="replace")
        if "Traceback" in log:
            self.violation(
                f"the daemon logged {log.count('Traceback')} tracebacks (see {self.daemon.log})"
            )


class _HashSink:
    """A write-only file that only hashes: pulls verify without keeping the bytes."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        self.size += len(data)
        return len(data)


async def casctl_async(address: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(CASCTL_TIMEOUT):
        return await trio.run_process(
            [str(BIN / "casctl"), "--server", address, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def run(config: Config) -> Figures:
    """Run the stress test; returns the figures (``figures.ok`` says whether it passed)."""
    made = config.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="casd-crash-")) if made else Path(config.workdir)  # type: ignore[arg-type]
    workdir.mkdir(parents=True, exist_ok=True)
    r = Run(config, workdir)
    r.say(f"casd crash stress: {config.trials} trials, seed {r.seed}, store in {workdir}/data")
    start = time.monotonic()
    try:
        trio.run(r.main)
    except Fatal:
        pass
    finally:
        r.daemon.kill()
        r.fig.elapsed = time.monotonic() - start
    if made and r.fig.ok and not config.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return r.fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=100, help="kills to survive (default 100)")
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    p.add_argument("--workers", type=int, default=3, help="in-process client workers")
    p.add_argument("--cli-workers", type=int, default=1, help="casctl subprocess workers")
    p.add_argument("--min-delay", type=float, default=0.05, help="earliest kill, seconds")
    p.add_argument("--max-delay", type=float, default=1.5, help="latest kill, seconds")
    p.add_argument("--sample", type=int, default=24, help="older blobs pulled per trial")
    p.add_argument("--workdir", type=Path, help="where the store and log go (kept)")
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    p.add_argument("-q", "--quiet", action="store_true", help="no line per trial")
    args = p.parse_args(argv)
    fig = run(
        Config(
            trials=args.trials,
            seed=args.seed,
            workers=args.workers,
            cli_workers=args.cli_workers,
            min_delay=args.min_delay,
            max_delay=args.max_delay,
            sample=args.sample,
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
