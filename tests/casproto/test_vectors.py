"""Golden frames (protocol/vectors/frames.json): the wire format must not drift."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from casproto import MESSAGE_CLASSES, Chunk, Codec, decode_body, encode_message

VECTORS_DIR = Path(__file__).resolve().parents[2] / "protocol" / "vectors"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS_DIR / "make_vectors.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = load_generator()
FRAMES: dict[str, dict[str, str]] = json.loads(
    (VECTORS_DIR / "frames.json").read_text(encoding="utf-8")
)


def test_stored_vectors_match_the_generator() -> None:
    assert list(FRAMES) == list(GENERATOR.VECTORS)


def test_every_message_type_has_a_vector() -> None:
    assert {type(message) for message in GENERATOR.VECTORS.values()} == set(MESSAGE_CLASSES)


@pytest.mark.parametrize("name", list(FRAMES))
def test_encoding_still_produces_the_stored_frame(name: str) -> None:
    assert encode_message(GENERATOR.VECTORS[name]).hex() == FRAMES[name]["hex"]


@pytest.mark.parametrize("name", list(FRAMES))
def test_stored_frame_decodes_to_its_message(name: str) -> None:
    frame = bytes.fromhex(FRAMES[name]["hex"])
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode_body(frame[4:]) == GENERATOR.VECTORS[name]


def test_chunk_vectors_carry_real_blake3_ids() -> None:
    blake3 = pytest.importorskip("blake3")
    for name, raw in GENERATOR.CHUNK_DATA.items():
        chunk = GENERATOR.VECTORS[name]
        assert isinstance(chunk, Chunk)
        assert chunk.id == blake3.blake3(raw).digest()


def test_zstd_chunk_vector_decompresses_to_its_chunk() -> None:
    zstd = pytest.importorskip("backports.zstd")
    chunk = GENERATOR.VECTORS["chunk_zstd"]
    assert chunk.codec is Codec.ZSTD
    assert zstd.decompress(chunk.data) == GENERATOR.CHUNK_DATA["chunk_zstd"]


def test_generator_check_mode_agrees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert GENERATOR.main(["--check"]) == 0
    stale = tmp_path / "frames.json"
    stale.write_text("{}\n", encoding="utf-8")
    monkeypatch.setattr(GENERATOR, "FRAMES", stale)
    assert GENERATOR.main(["--check"]) == 1
    assert GENERATOR.main([]) == 0
    assert GENERATOR.main(["--check"]) == 0
