"""Request bodies sent compressed (Content-Encoding gzip or deflate), decoded strictly.

aiohttp's own decoding is switched off (connections.runner_settings): it accepts a gzip body
cut before its trailer (CRC and length unchecked), and it bounds only the compressed size. Here
a body must be whole (every member ends, nothing follows) and its decoded size is bounded by
the same limit as a plain body (413 above), so a small bomb cannot expand past it.
"""
from __future__ import annotations

import zlib

from serving.api_errors import ApiError

CHUNK = 1 << 16
GZIP_WBITS, ZLIB_WBITS, RAW_DEFLATE_WBITS = 16 + zlib.MAX_WBITS, zlib.MAX_WBITS, -zlib.MAX_WBITS
ENCODINGS = ("gzip", "x-gzip", "deflate", "identity")


def _is_zlib_header(data: bytes) -> bool:
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def _broken(encoding: str, why: str) -> ApiError:
    return ApiError(400, f"request body could not be decoded as Content-Encoding {encoding} "
                         f"({why}): send it whole, or uncompressed without the header")


def _inflate(data: bytes, wbits: int, encoding: str, limit: int) -> bytes:
    """Every member of `data`, decoded; at most `limit` bytes out."""
    out, rest = [], data
    size = 0
    while True:
        decoder = zlib.decompressobj(wbits)
        pending = rest
        try:
            while pending and not decoder.eof:
                chunk = decoder.decompress(pending, min(CHUNK, limit + 1 - size))
                size += len(chunk)
                out.append(chunk)
                if size > limit:
                    raise ApiError(413, f"request body decodes to over {limit} bytes, the "
                                        f"limit: send a smaller body, or start the server with "
                                        f"a larger --max-body-bytes")
                pending = decoder.unconsumed_tail
        except zlib.error as e:
            raise _broken(encoding, str(e)) from None
        if not decoder.eof:
            raise _broken(encoding, "it ends before its end marker and trailer")
        rest = decoder.unused_data
        if not rest or wbits != GZIP_WBITS:   # gzip alone may hold several members
            break
    if rest:
        raise _broken(encoding, f"{len(rest)} bytes follow its end")
    return b"".join(out)


def decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """`raw` decoded per its Content-Encoding header ('' for none); ApiError 400 when it does
    not decode whole, 413 over `limit`, 415 for an encoding not served."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding in ("gzip", "x-gzip"):
        return _inflate(raw, GZIP_WBITS, encoding, limit)
    if encoding == "deflate":   # zlib-wrapped as the RFC says; raw deflate as some clients send
        wbits = ZLIB_WBITS if _is_zlib_header(raw) else RAW_DEFLATE_WBITS
        return _inflate(raw, wbits, encoding, limit)
    raise ApiError(415, f"Content-Encoding {encoding!r} is not served: send the body "
                        f"uncompressed, or as gzip or deflate", param="Content-Encoding")
