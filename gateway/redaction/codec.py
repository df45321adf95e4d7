"""Content-Encoding: bounded streaming decoders and matching encoders (gzip, deflate, br, zstd).

Every decoder yields output in bounded pieces so a decompression bomb is stopped at the limit
instead of being inflated first: zlib via ``max_length``; brotli (no output bound in the
bindings before 1.2) by feeding 8 input bytes per call (one brotli meta-block, at most 16 MiB,
can finish per byte); zstd by feeding 64 input bytes per call (a block is at most 128 KiB and
takes at least a few input bytes).
"""

from __future__ import annotations

import zlib
from typing import Iterator

import brotli
import zstandard

from .settings import NotRedactable

SUPPORTED = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})
_PIECE = 64 * 1024
_BR_STEP = 8
_ZSTD_STEP = 64


def parse_encodings(header: str | None) -> list[str]:
    """Codings in the order they were applied; ``identity`` dropped. Unknown -> NotRedactable."""
    if not header:
        return []
    encs = [e.strip().lower() for e in header.split(",")]
    encs = [("gzip" if e == "x-gzip" else e) for e in encs if e and e != "identity"]
    for e in encs:
        if e not in SUPPORTED:
            raise NotRedactable("unsupported_encoding", f"content-encoding {e!r} is not supported")
    if len(encs) > 2:
        raise NotRedactable("unsupported_encoding", "more than two content codings")
    return encs


def _zstd_obj() -> zstandard.ZstdDecompressionObj:
    return zstandard.ZstdDecompressor().decompressobj()


class Decoder:
    """Incremental decoder for one coding. ``feed``/``finish`` yield decoded pieces."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self.raw_deflate = False
        self._head = b""
        self._z: zlib._Decompress | None = None  # type: ignore[name-defined]
        self._br = brotli.Decompressor() if encoding == "br" else None
        self._zs = _zstd_obj() if encoding == "zstd" else None
        self._seen = False
        if encoding == "gzip":
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        if not data:
            return
        self._seen = True
        try:
            if self.encoding in ("gzip", "deflate"):
                yield from self._feed_zlib(data)
            elif self._br is not None:
                br = self._br
                for i in range(0, len(data), _BR_STEP):
                    out = br.process(data[i:i + _BR_STEP])
                    if out:
                        yield out
            else:
                yield from self._feed_zstd(data)
        except (zlib.error, brotli.error, zstandard.ZstdError) as exc:
            raise NotRedactable("undecodable", f"{self.encoding} data is corrupt ({type(exc).__name__})") from None

    def _feed_zstd(self, data: bytes) -> Iterator[bytes]:
        buf, i = data, 0
        while i < len(buf):
            zs = self._zs
            if zs.eof:  # next frame
                if not buf[i:].strip(b"\x00"):
                    return
                self._zs = zs = _zstd_obj()
            step = buf[i:i + _ZSTD_STEP]
            i += _ZSTD_STEP
            out = zs.decompress(step)
            if out:
                yield out
            if zs.eof and zs.unused_data:
                buf, i = zs.unused_data + buf[i:], 0

    def _feed_zlib(self, data: bytes) -> Iterator[bytes]:
        if self._z is None:  # deflate: zlib-wrapped (RFC 9110) or, as some servers send, raw
            self._head += data
            if len(self._head) < 2:
                return
            data, self._head = self._head, b""
            cmf, flg = data[0], data[1]
            wrapped = (cmf & 0x0F) == 8 and (cmf >> 4) <= 7 and ((cmf << 8) | flg) % 31 == 0
            self.raw_deflate = not wrapped
            self._z = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        pending = data
        while True:
            z = self._z
            if z.eof:
                if not pending.strip(b"\x00"):
                    return
                if self.encoding != "gzip":
                    raise NotRedactable("undecodable", "data after the end of the deflate stream")
                self._z = z = zlib.decompressobj(16 + zlib.MAX_WBITS)  # next gzip member
            out = z.decompress(pending, _PIECE)
            if out:
                yield out
            if z.eof:
                pending = z.unused_data
                if not pending:
                    return
                continue
            pending = z.unconsumed_tail
            if not pending and len(out) < _PIECE:
                return

    def finish(self) -> list[bytes]:
        """Remaining output (none: decoders emit eagerly); raises NotRedactable when the
        stream was cut short."""
        if not self._seen:
            return []
        if self.encoding in ("gzip", "deflate"):
            if self._z is None or not self._z.eof:
                raise NotRedactable("undecodable", f"{self.encoding} data is truncated")
        elif self._br is not None:
            if not self._br.is_finished():
                raise NotRedactable("undecodable", "br data is truncated")
        elif self._zs is not None and not self._zs.eof:
            raise NotRedactable("undecodable", "zstd data is truncated")
        return []


class Encoder:
    """Incremental encoder for one coding; ``flush`` makes everything so far decodable (SSE)."""

    def __init__(self, encoding: str, *, raw_deflate: bool = False) -> None:
        self.encoding = encoding
        if encoding == "gzip":
            self._z = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS if raw_deflate else zlib.MAX_WBITS)
        elif encoding == "br":
            self._br = brotli.Compressor(quality=5)
        else:
            self._zs = zstandard.ZstdCompressor(level=3).compressobj()

    def compress(self, data: bytes) -> bytes:
        if self.encoding in ("gzip", "deflate"):
            return self._z.compress(data)
        if self.encoding == "br":
            return self._br.process(data)
        return self._zs.compress(data)

    def flush(self) -> bytes:
        if self.encoding in ("gzip", "deflate"):
            return self._z.flush(zlib.Z_SYNC_FLUSH)
        if self.encoding == "br":
            return self._br.flush()
        return self._zs.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def finish(self) -> bytes:
        if self.encoding in ("gzip", "deflate"):
            return self._z.flush(zlib.Z_FINISH)
        if self.encoding == "br":
            return self._br.finish()
        return self._zs.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


def decode(body: bytes, encodings: list[str], limit: int) -> tuple[bytes, list[bool]]:
    """Decode a whole body (codings undone in reverse); returns the data and, per coding,
    whether deflate was raw (so it is re-encoded the same way)."""
    raws = [False] * len(encodings)
    data = body
    for idx in range(len(encodings) - 1, -1, -1):
        dec = Decoder(encodings[idx])
        out = bytearray()
        for piece in dec.feed(data):
            out += piece
            if len(out) > limit:
                raise NotRedactable("decompression_limit", f"decoded body exceeds {limit} bytes")
        dec.finish()
        raws[idx] = dec.raw_deflate
        data = bytes(out)
    return data, raws


def encode(data: bytes, encodings: list[str], raws: list[bool] | None = None) -> bytes:
    for idx, enc in enumerate(encodings):
        if enc == "zstd":  # one-shot: the frame header then carries the content size
            data = zstandard.ZstdCompressor(level=3).compress(data)
        elif enc == "br":
            data = brotli.compress(data, quality=5)
        else:
            e = Encoder(enc, raw_deflate=bool(raws and raws[idx]))
            data = e.compress(data) + e.finish()
    return data
