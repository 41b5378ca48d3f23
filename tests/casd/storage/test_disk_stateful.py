"""DiskStore against a dict model, through puts, tags, untags and reopenings."""

from __future__ import annotations

import hashlib
import shutil
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from casd.storage.disk import DiskStore
from casd.storage.testing import read_blob, store_blob

NAMES = st.sampled_from(["a", "b", "c/d", "é"])
# Small blobs, with repeats so chunks are shared between blobs.
BLOBS = st.builds(
    lambda seed, reps: (hashlib.sha256(seed).digest() * 2048)[:40_000] * reps,
    st.binary(min_size=1, max_size=2),
    st.integers(1, 3),
)


class DiskStoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.store = DiskStore(self.dir + "/s")
        self.blobs: dict[str, bytes] = {}
        self.names: dict[str, str] = {}

    @rule(data=BLOBS, name=st.none() | NAMES)
    def put(self, data: bytes, name: str | None) -> None:
        recipe = store_blob(self.store, data, name)
        self.blobs[recipe.digest] = data
        if name is not None:
            self.names[name] = recipe.digest

    @precondition(lambda self: self.blobs)
    @rule(name=NAMES, pick=st.integers(0, 100))
    def tag(self, name: str, pick: int) -> None:
        digest = sorted(self.blobs)[pick % len(self.blobs)]
        self.store.tag(name, digest)
        self.names[name] = digest

    @precondition(lambda self: self.names)
    @rule(pick=st.integers(0, 100))
    def untag(self, pick: int) -> None:
        name = sorted(self.names)[pick % len(self.names)]
        self.store.untag(name)
        del self.names[name]

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = DiskStore(self.dir + "/s")

    @invariant()
    def matches_the_model(self) -> None:
        assert dict(self.store.list_names()) == self.names
        assert dict(self.store.iter_blobs()) == {d: len(b) for d, b in self.blobs.items()}
        for digest, data in self.blobs.items():
            assert read_blob(self.store, digest) == data

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestDiskStoreMachine = DiskStoreMachine.TestCase
TestDiskStoreMachine.settings = settings(max_examples=25, stateful_step_count=15, deadline=None)
