"""A digest of the tensors in a safetensors file, independent of how the file happens to be laid out.

Two exports of the same encoder weights (loaded from a .pth once and a .safetensors once, or seeded
twice alike) write files that may differ byte for byte (tensor order, metadata), yet hold the same
weights; the encoder record must call them the same. The digest covers each tensor's name, dtype,
shape and bytes, in name order, and nothing else. It is read straight from the file format (an 8-byte
header length, a JSON header, the raw data), so no torch is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

from ..errors import InputError

__all__ = ["tensor_digest"]


def tensor_digest(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        try:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not a safetensors file ({e})") from None
        start = 8 + size
        h = hashlib.sha256()
        for name in sorted(k for k in header if k != "__metadata__"):
            entry = header[name]
            begin, end = entry["data_offsets"]
            h.update(f"{name}\0{entry['dtype']}\0{entry['shape']}\0".encode())
            f.seek(start + begin)
            h.update(f.read(end - begin))
    return h.hexdigest()
