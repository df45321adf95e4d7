"""A raw-socket HTTP/1.1 client for driving the forward proxy byte for byte (absolute-form targets,
duplicate headers, raw bytes in a tunnel): what well-behaved clients never send."""
from __future__ import annotations

import base64
import socket
import ssl
from pathlib import Path


def address(hostport: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (as the gateway's listeners are named) as a socket address."""
    host, port = hostport.rsplit(":", 1)
    return host, int(port)


def proxy_addr(gw) -> tuple[str, int]:
    return address(gw.proxy)


def read_response(sock, timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (Content-Length or chunked or close)."""
    sock.settimeout(timeout)
    status, headers, body = _read_head(sock, 65536)
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(body) < n:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        body = body[:n]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        out = b""
        data = body
        while True:
            while b"\r\n" not in data:
                c = sock.recv(65536)
                if not c:
                    return status, headers, out
                data += c
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(data) < size + 2:
                c = sock.recv(65536)
                if not c:
                    break
                data += c
            if size == 0:
                break
            out += data[:size]
            data = data[size + 2:]
        body = out
    elif status not in (204, 304) and not status // 100 == 1 and status != 200 or headers.get("connection") == "close":
        try:
            while True:
                c = sock.recv(65536)
                if not c:
                    break
                body += c
        except socket.timeout:
            pass
    return status, headers, body


def tunnel(gw, target: str, token: str | None, ca_file: Path, server_hostname: str = "127.0.0.1"):
    """CONNECT through the proxy (Proxy-Authorization: Bearer token) and wrap TLS with the gateway's CA."""
    sock = socket.create_connection(proxy_addr(gw), timeout=20)
    auth = f"Proxy-Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode())
    status, headers, _ = read_response_head_only(sock)
    assert status == 200, (status, headers)
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = False
    return ctx.wrap_socket(sock, server_hostname=server_hostname)


def read_response_head_only(sock) -> tuple[int, dict[str, str], bytes]:
    """The status line and headers, read byte by byte: nothing after them is consumed (after a
    CONNECT, the TLS handshake that follows is the caller's)."""
    sock.settimeout(20)
    return _read_head(sock, 1)


def _read_head(sock, step: int) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, whatever was read past the head)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(step)
        if not chunk:
            break
        buf += chunk
    return split_response(buf)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, the bytes after the head) of a raw response."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, rest


def exchange(addr: tuple[str, int], raw: bytes, timeout: float = 20.0) -> bytes:
    """Everything the server at ``addr`` answers to ``raw``, until it closes the connection."""
    with socket.create_connection(addr, timeout=timeout) as sock:
        sock.sendall(raw)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def through_proxy(gw, raw: bytes, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` (one request, absolute-form) to the forward proxy; its response."""
    with socket.create_connection(proxy_addr(gw), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_response(sock, timeout)


def in_tunnel(gw, target: str, token: str, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` (one request) inside a TLS tunnel to ``target`` opened with ``token``; its response."""
    with tunnel(gw, target, token, gw.ca_file) as sock:
        sock.sendall(raw)
        return read_response(sock)


def basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"agent:{token}".encode()).decode()
