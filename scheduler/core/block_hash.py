"""Chained hashes of full KV blocks: the keys of the prefix cache.

    block 0: h0 = H(no parent, salt, tokens[0:bs])
    block i: hi = H(h(i-1),    "",   tokens[i*bs:(i+1)*bs])

A block's hash covers every token before it, so equal hashes mean equal prefixes and a block can
stand for its whole prefix. H is SHA-256 over a fixed layout (32-byte parent, length-prefixed
extra key, int32 tokens): deterministic in every process (unlike Python's hash of a str) and
collision-resistant, so a crafted prompt cannot alias another request's cached blocks.
"""

import hashlib
from array import array
from collections.abc import Sequence

_NO_PARENT = bytes(32)


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_key: str = "") -> bytes:
    """The hash of one full block, chained to its parent's (None for the first block).

    extra_key separates caches that must not share blocks (a salt, a LoRA adapter, ...).
    """
    extra = extra_key.encode()
    digest = hashlib.sha256(parent or _NO_PARENT)
    digest.update(len(extra).to_bytes(8, "little"))
    digest.update(extra)
    digest.update(array("i", token_ids).tobytes())
    return digest.digest()
