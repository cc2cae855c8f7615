"""Raw HTTP/1.1 over asyncio sockets: requests byte for byte, answers as the server sent them."""
from __future__ import annotations

import asyncio
import json

HANG_GUARD = 60.0        # seconds before a test gives up waiting: the server hangs


def request_bytes(body: bytes | dict = b"{}", path: str = "/generate", method: str = "POST",
                  **headers) -> bytes:
    """One HTTP/1.1 request (Connection: close, so the server ends the exchange)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    head = {"Host": "localhost", "Content-Type": "application/json",
            "Content-Length": str(len(body)), "Connection": "close"}
    head.update({k.replace("_", "-"): v for k, v in headers.items()})
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items() if v is not None)
    return f"{method} {path} HTTP/1.1\r\n".encode() + lines.encode("latin-1", "surrogateescape") \
        + b"\r\n" + body


def status_of(raw: bytes) -> int | None:
    """The answer's status; None when the server closed without one."""
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.") else None


def body_of(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


async def exchange(port: int, data: bytes) -> bytes:
    """Send `data`, read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), HANG_GUARD)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()
