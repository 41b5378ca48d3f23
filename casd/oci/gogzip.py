"""Go's gzip, made again: layers written by umoci, skopeo, podman and buildah.

Those tools compress layers with klauspost/pgzip. Python's zlib does not make the same
bytes, so until now casd kept such layers as they came: their compressed bytes beside
their tar, moved whole between hosts, with no delta. pgzip's output is a function of the
input, the level and the block size alone (each block is deflated on its own, with the
previous block's last 16 KiB as dictionary; how many blocks run at once changes
nothing), so a program built from the same library sources makes the same bytes again.

That program is ``casd-gogzip`` (``casd/oci/gohelper/main.go``), built from the Go
sources Debian packages: ``golang-github-klauspost-pgzip-dev`` 1.2.5 and
``golang-github-klauspost-compress-dev`` 1.15.12, the versions Debian's umoci was built
with (its ``Built-Using``). Build it with::

    apt-get install golang-go golang-github-klauspost-pgzip-dev \\
        golang-github-klauspost-compress-dev
    python -m casd.oci.gogzip build          # writes casd-gogzip next to the interpreter

Nothing it writes is trusted: the importer compares its output with the layer byte for
byte before recording the layer as re-encodable, and every host checks the digest of
what it made before serving it. A host without the helper (or with a different build)
gets the compressed bytes instead, as before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Any

from casd.oci.gzipre import LayerFormatError, parse_header

CODEC = "gzip-pgzip"
HELPER = "casd-gogzip"
SOURCE = Path(__file__).with_name("gohelper") / "main.go"
#: pgzip's levels: -1 is its default (not 6: klauspost's default differs), 0-9 as zlib's.
LEVELS = range(-1, 10)
#: Block sizes to try, likeliest first: umoci's SetConcurrency(256 KiB, ...), then
#: pgzip's default (what containers/image, so skopeo, podman and buildah, leaves it at).
BLOCKS = (256 * 1024, 1024 * 1024)
#: pgzip refuses blocks of its dictionary size (16 KiB) or less.
MIN_BLOCK = 16 * 1024 + 1
MAX_BLOCK = 64 * 1024 * 1024
#: Tar bytes a second the helper makes again, measured here (2 cores: 89-91 MB/s on the
#: benchmark's Debian and Python layers); what a sync weighs against the link's rate.
REENCODE_RATE = 90e6
#: The helper writes pgzip's default header, this long; the layer's own replaces it.
_HELPER_HEADER = 10
#: Debian packages whose sources the helper is built from (their versions go into it).
DEBIAN_SOURCES = ("golang-github-klauspost-pgzip-dev", "golang-github-klauspost-compress-dev")
GOPATH = "/usr/share/gocode"


class HelperMissing(LayerFormatError):
    """This host has no ``casd-gogzip`` to make a Go-written layer again."""


@dataclass(frozen=True)
class PgzipParams:
    level: int
    block: int
    header: bytes  # the layer's gzip header, byte for byte
    lib: str = ""  # the helper's library versions that verified it (informational)

    def to_dict(self) -> dict[str, Any]:
        header = self.header.hex()
        return {"level": self.level, "block": self.block, "header": header, "lib": self.lib}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PgzipParams:
        """Inverse of :meth:`to_dict`. Raises LayerFormatError on anything malformed."""
        try:
            params = cls(
                level=int(d["level"]),
                block=int(d["block"]),
                header=bytes.fromhex(str(d["header"])),
                lib=str(d.get("lib", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LayerFormatError(f"unreadable {CODEC} parameters {d!r}") from exc
        if (
            params.level not in LEVELS
            or not MIN_BLOCK <= params.block <= MAX_BLOCK
            or parse_header(params.header) != len(params.header)
        ):
            raise LayerFormatError(f"invalid {CODEC} parameters {d!r}")
        return params


# --- the helper ---------------------------------------------------------------------


def helper() -> str | None:
    """Where this host's ``casd-gogzip`` is: ``$CASD_GOGZIP``, else beside the Python
    that runs casd (a venv's ``bin``), else on ``PATH``; None if nowhere, or if
    ``$CASD_GOGZIP`` is set but empty (no helper wanted)."""
    env = os.environ.get("CASD_GOGZIP")
    if env is not None:
        return env if env and os.access(env, os.X_OK) else None
    beside = Path(sys.executable).with_name(HELPER)
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(HELPER)


def require_helper() -> str:
    path = helper()
    if path is None:
        raise HelperMissing(
            f"this layer was written by Go's pgzip and this host has no {HELPER} to make it "
            "again (build it: python -m casd.oci.gogzip build)"
        )
    return path


@cache
def helper_version(path: str) -> str:
    """The library versions ``path`` was built with (``-version``)."""
    try:
        done = subprocess.run([path, "-version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise HelperMissing(f"{path} does not run: {exc}") from None
    return done.stdout.decode(errors="replace").strip()


def build(out: str | Path | None = None, gopath: str = GOPATH) -> Path:
    """Build ``casd-gogzip`` from the Go sources in ``gopath`` (Debian's by default) into
    ``out`` (beside this Python by default). Raises OSError naming what is missing."""
    target = Path(out) if out is not None else Path(sys.executable).with_name(HELPER)
    go = shutil.which("go")
    if go is None:
        raise OSError("no `go` on PATH: apt-get install golang-go")
    pgzip = Path(gopath, "src/github.com/klauspost/pgzip")
    if not pgzip.is_dir():
        raise OSError(
            f"no klauspost/pgzip sources in {gopath}: apt-get install " + " ".join(DEBIAN_SOURCES)
        )
    libs = ", ".join(f"{name} {_deb_version(name)}" for name in DEBIAN_SOURCES)
    go_version = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True).stdout
    libs += f", {go_version.strip()}"
    with tempfile.TemporaryDirectory(prefix="casd-gobuild-") as tmp:
        env = {
            **os.environ,
            "GO111MODULE": "off",  # Debian ships sources in GOPATH layout, no modules
            "GOPATH": gopath,
            "GOCACHE": os.path.join(tmp, "cache"),
            "CGO_ENABLED": "0",
        }
        tmp_out = os.path.join(tmp, HELPER)
        cmd = [go, "build", "-trimpath", "-ldflags", f"-X 'main.libs={libs}'", "-o", tmp_out]
        done = subprocess.run([*cmd, str(SOURCE)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"go build failed: {done.stderr.strip()}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(tmp_out, target)
    helper_version.cache_clear()
    return target


def _deb_version(package: str) -> str:
    try:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True
        )
    except OSError:
        return "?"
    return done.stdout.strip() or "?"


# --- encoding -----------------------------------------------------------------------


def _drain(stdout: IO[bytes], out: list[bytes], lock: threading.Lock) -> None:
    # A function, not a method: a thread holding the encoder would keep an encoder given
    # up on (and its helper, waiting for input) alive for ever.
    try:
        while piece := stdout.read(1024 * 1024):
            with lock:
                out.append(piece)
    except (OSError, ValueError):  # closed under it: the encoder was given up on
        pass


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


class PgzipEncoder:
    """The layer's gzip stream made again by the helper, fed the tar in order; the same
    interface as :class:`casd.oci.gzipre.GzipEncoder`. The helper compresses on every
    core while the caller goes on; its output is collected by a thread of its own, so
    neither side of the pipe waits on the other. An encoder dropped before ``finish``
    takes its helper process with it."""

    #: Takes input in pieces of any size: the helper gathers its blocks itself.
    buffers_input = True

    def __init__(self, params: PgzipParams, path: str | None = None) -> None:
        self.params = params
        argv = [path or require_helper(), f"-level={params.level}", f"-block={params.block}"]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
        )
        self._finalizer = weakref.finalize(self, _stop, self._proc)
        self._lock = threading.Lock()
        self._out: list[bytes] = []
        self._header_due = True
        self._skip = _HELPER_HEADER
        self._finished = False
        self._reader = threading.Thread(
            target=_drain,
            args=(self._proc.stdout, self._out, self._lock),
            name="casd-gogzip-out",
            daemon=True,
        )
        self._reader.start()

    def _take(self) -> bytes:
        with self._lock:
            out = b"".join(self._out)
            self._out.clear()
        if self._skip:
            cut = min(self._skip, len(out))
            out, self._skip = out[cut:], self._skip - cut
        if self._header_due:
            self._header_due = False
            out = self.params.header + out
        return out

    def _failure(self, what: str) -> LayerFormatError:
        # Called once the helper exited: its stderr is whole.
        err = b""
        if self._proc.stderr is not None and not self._proc.stderr.closed:
            err = self._proc.stderr.read()
        self._finalizer()
        detail = err.decode(errors="replace").strip() or f"exit status {self._proc.returncode}"
        return LayerFormatError(f"{HELPER} {what}: {detail}")

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """Hand the helper more input; returns the output ready so far (may be empty)."""
        if self._finished:
            raise ValueError("update() after finish()")
        view = memoryview(data).cast("B")
        stdin: IO[bytes] = self._proc.stdin  # type: ignore[assignment]
        try:
            while view:
                n = stdin.write(view)
                view = view[n or 0 :]
        except (BrokenPipeError, ValueError):
            self._proc.wait()
            raise self._failure("stopped") from None
        return self._take()

    def finish(self) -> bytes:
        """The rest of the stream, trailer included."""
        if self._finished:
            raise ValueError("finish() called twice")
        self._finished = True
        with contextlib.suppress(BrokenPipeError):
            self._proc.stdin.close()  # type: ignore[union-attr]
        self._reader.join()
        if self._proc.wait() != 0:
            raise self._failure("failed")
        out = self._take()
        self._finalizer()
        return out

    def close(self) -> None:
        """Stop the helper (an encoder given up on before ``finish``)."""
        self._finished = True
        self._finalizer()


def encode(
    params: PgzipParams, data: bytes | bytearray | memoryview, path: str | None = None
) -> bytes:
    """``data`` compressed whole, as :class:`PgzipEncoder` streams it."""
    enc = PgzipEncoder(params, path)
    head = enc.update(data)
    return head + enc.finish()


# --- finding the parameters ---------------------------------------------------------


def _common_prefix(a: bytes | memoryview, b: bytes | memoryview) -> int:
    n = min(len(a), len(b))
    lo = 0
    step = 4096
    while lo < n and a[lo : lo + step] == b[lo : lo + step]:
        lo += step
    hi = min(lo + step, n)
    while lo < hi and a[lo] == b[lo]:
        lo += 1
    return lo


def _sample_matches(
    params: PgzipParams, compressed: bytes | bytearray, uncompressed: bytes | bytearray, path: str
) -> bool:
    """Whether the helper with ``params`` makes the start of ``compressed`` from the start
    of ``uncompressed`` (four blocks of it): every block but the last of a stream comes
    out the same whatever follows it, and the last's bytes up to its closing marker."""
    sample = memoryview(uncompressed)[: 4 * params.block]
    made = memoryview(encode(params, sample, path))[len(params.header) : -8]
    body = memoryview(compressed)[len(params.header) :]
    if len(sample) < 4 * params.block and len(body) >= len(made) + 8:  # the whole stream
        return bytes(body[: len(made)]) == bytes(made)
    return len(made) > 0 and _common_prefix(body, made) >= len(made) * 3 // 4


def find_params(
    compressed: bytes | bytearray, uncompressed: bytes | bytearray
) -> PgzipParams | None:
    """pgzip settings that make the start of a gzip layer, judged on its first blocks:
    ``compressed`` is the layer's start (header included), ``uncompressed`` at least
    four MiB of what it decodes to (or all of it). A candidate the caller must verify on
    the whole layer; None if no setting fits.

    Raises:
        HelperMissing: there is no helper to try with.
    """
    path = require_helper()
    size = parse_header(compressed)
    if size is None:
        return None
    lib = helper_version(path)
    for block in BLOCKS:
        for level in LEVELS:
            params = PgzipParams(level, block, bytes(compressed[:size]), lib)
            if _sample_matches(params, compressed, uncompressed, path):
                return params
    return None


def sample_matches(
    params: PgzipParams, compressed: bytes | bytearray, uncompressed: bytes | bytearray
) -> bool:
    """Whether this host's helper makes the start of a layer recorded with ``params``
    (a landing's quick check before it keeps bytes it has not made in full)."""
    path = helper()
    return path is not None and _sample_matches(params, compressed, uncompressed, path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m casd.oci.gogzip",
        description="Build or locate casd-gogzip, the helper that makes Go-written "
        "(klauspost/pgzip) layers again so casd can move them as deltas.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build it from Debian's Go sources")
    b.add_argument("--out", help=f"where to write it (default: beside {sys.executable})")
    b.add_argument(
        "--gopath", default=GOPATH, help="Go sources in GOPATH layout (default: %(default)s)"
    )
    sub.add_parser("which", help="print where casd finds it, and its library versions")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        try:
            path = build(args.out, args.gopath)
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{path}: {helper_version(str(path))}")
        return 0
    found = helper()
    if found is None:
        print(f"error: no {HELPER} (python -m casd.oci.gogzip build)", file=sys.stderr)
        return 1
    print(f"{found}: {helper_version(found)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
