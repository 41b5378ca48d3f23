"""The CI smoke run of the headline benchmark (issue #6): `bench/oci.py --quick` builds
the tiny offline corpus, runs plain and casd pulls of its versions over one emulated link,
and writes its JSON and chart. Figures are not judged here (bench/RESULTS.md reports them);
this checks that the benchmark runs end to end and that casd served every image exactly
as the registry did (the runner compares the manifests after every step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.wanlink import available

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    os.geteuid() != 0 or available() is not None,
    reason=f"needs root and network namespaces: {available() or 'not root'}",
)
def test_the_oci_benchmark_quick_run_completes(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, str(REPO / "bench" / "oci.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    (result,) = tmp_path.glob("oci-*-quick.json")
    data = json.loads(result.read_text())
    kinds = {(s["kind"], s["step"].startswith("cold")) for s in data["steps"]}
    assert kinds == {("real", True), ("real", False), ("converted", True), ("converted", False)}
    for step in data["steps"]:
        assert step["plain"]["wire"] > 0
        assert step["casd"]["wire"] > 0
    # The converted steps' syncs, with deltas and with chunks only, ran a second time,
    # each from where its daemon stood before: they moved what the first run did again,
    # not nothing (the new version was removed and collected in between).
    again = [s for s in data["steps"] if s["sync_seconds"]]
    assert again
    for step in again:
        assert set(step["sync_wire"]) == {"casd", "chunks_only"}
        for key, wires in step["sync_wire"].items():
            assert len(wires) == len(step["sync_seconds"][key]) == 2
            assert wires[1] > 0.5 * wires[0] > 0
    assert any("median of 2 runs each" in v for v in data["verdicts"])
    assert list(tmp_path.glob("oci-*-quick.png"))
