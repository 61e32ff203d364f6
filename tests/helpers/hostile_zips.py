"""Hostile archives built byte by byte: what a stray file in a watched folder can be.

zipfile refuses to write most of these (encrypted members, unknown methods, headers that lie), so
this writes the local headers and central directory itself.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RawEntry:
    name: str
    data: bytes  # the bytes as stored (already compressed when method is 8)
    method: int = zipfile.ZIP_STORED
    flags: int = 0
    crc: int = 0
    size: int = 0  # the uncompressed size the headers declare


def raw_zip(entries: list[RawEntry]) -> bytes:
    out = bytearray()
    central = bytearray()
    for e in entries:
        name = e.name.encode()
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, e.flags, e.method, 0, 0x21, e.crc, len(e.data), e.size,
                           len(name), 0)
        out += name + e.data
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, e.flags, e.method, 0, 0x21, e.crc, len(e.data),
                               e.size, len(name), 0, 0, 0, 0, 0o644 << 16, offset)
        central += name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), len(out), 0)
    return bytes(out + central + end)


def stored(name: str, data: bytes, *, method: int = zipfile.ZIP_STORED, flags: int = 0) -> RawEntry:
    return RawEntry(name, data, method=method, flags=flags, crc=zlib.crc32(data), size=len(data))


def encrypted_zip() -> bytes:
    """A tiny archive whose one member carries the 'encrypted' flag (zipfile: RuntimeError on read)."""
    return raw_zip([stored("manifest.json", b'{"schema": "edgekit.bundle/1"}', flags=0x1)])


def unsupported_method_zip(method: int = 99) -> bytes:
    """A member with a compression method zipfile cannot read (99 = AES; NotImplementedError on read)."""
    return raw_zip([stored("manifest.json", b'{"schema": "edgekit.bundle/1"}', method=method)])


def deflated_zeros(mib: int) -> tuple[bytes, int]:
    """A raw deflate stream of `mib` MiB of zeros (about 1 KiB per MiB) and its crc32, built without
    compressing `mib` MiB: after a full flush the encoder state is reset, so one block repeats."""
    block = b"\0" * 1024**2
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(block, crc)
    return chunk * mib + tail, crc


def bomb_entry(name: str, mib: int, *, declared: int | None = None) -> RawEntry:
    data, crc = deflated_zeros(mib)
    return RawEntry(name, data, method=zipfile.ZIP_DEFLATED, crc=crc, size=mib * 1024**2 if declared is None
                    else declared)


def bomb_beside(good: Path, *, mib: int = 600, member: str = "model.onnx") -> bytes:
    """The good bundle's own signed manifest and signature, with `member` replaced by `mib` MiB of
    zeros that compress to well under 1 MB: the signature checks out, only the sizes can stop it."""
    with zipfile.ZipFile(good) as zf:
        entries = [stored(i.filename, zf.read(i)) for i in zf.infolist() if i.filename != member]
    return raw_zip([*entries, bomb_entry(member, mib)])
