"""The store-independent half of a check: recipes against the index, blobs, names."""

from __future__ import annotations

import hashlib
from typing import Any

from casd.chunking import format_digest
from casd.errors import StoreError
from casd.storage.interface import CheckResult


def check_blobs_and_names(store: Any, result: CheckResult) -> None:
    """Add what recipes and names show to ``result`` (chunk records checked already)."""
    for digest, _size in list(store.iter_blobs()):
        result.blobs += 1
        recipe = store.get_recipe(digest)
        present = store.has_chunks(list(recipe.ids))
        absent = {
            cid: size
            for cid, size, ok in zip(recipe.ids, recipe.sizes, present, strict=True)
            if not ok
        }
        if absent:
            result.missing.update(absent)
            result.blobs_incomplete.append(digest)
            continue
        if not result.deep or any(cid in result.damaged for cid in recipe.ids):
            if any(cid in result.damaged for cid in recipe.ids):
                result.blobs_damaged.append(digest)
            continue
        sha = hashlib.sha256()
        try:
            for cid in recipe.ids:
                sha.update(store.get_chunk(cid))
        except StoreError:
            result.blobs_damaged.append(digest)
            continue
        if format_digest(sha.digest()) != digest:
            result.blobs_damaged.append(digest)
    blobs = {d for d, _ in store.iter_blobs()}
    for name, digest in store.list_names():
        result.names += 1
        if digest not in blobs:
            result.names_dangling.append(name)
