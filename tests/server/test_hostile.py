"""Hostile requests against the real server: each has an expected status,
and afterwards the server is up and consistent (same stats, same search
results, the health check answers, and it stops cleanly)."""
import json
import socket
import struct
import threading
import time
import zlib

import pytest

from serverlib import TOKEN, Server

H = b"Host: 127.0.0.1\r\n"
JSON = b"Content-Type: application/json\r\n"


def post(path, body, ctype=JSON, extra=b""):
    return (b"POST " + path + b" HTTP/1.1\r\n" + H + ctype + extra +
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


def get(path, extra=b"", method=b"GET"):
    return method + b" " + path + b" HTTP/1.1\r\n" + H + extra + b"Connection: close\r\n\r\n"


def form(fields, boundary=b"XyZ", close=True):
    out = b""
    for name, filename, data in fields:
        out += b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + name + b"\""
        if filename:
            out += b"; filename=\"" + filename + b"\""
        out += b"\r\n\r\n" + data + b"\r\n"
    if close:
        out += b"--" + boundary + b"--\r\n"
    return out


def mpart(body, boundary=b"XyZ", path=b"/api/search", extra=b""):
    return post(path, body, b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n", extra)


def png_header(w, h):
    """A PNG whose IHDR claims w x h pixels (and no real data)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk +
            struct.pack(">I", zlib.crc32(chunk)) + b"\0\0\0\0IDAT" + b"\0" * 8)


AUTH_BAD = b"Authorization: Bearer " + b"x" * len(TOKEN) + b"\r\n"
AUTH_LONG = b"Authorization: Bearer " + TOKEN.encode() + b"x\r\n"

# (name, raw request, expected statuses)
HOSTILE = [
    ("path traversal", get(b"/../../etc/passwd"), {404}),
    ("encoded traversal", get(b"/%2e%2e/%2e%2e/etc/passwd"), {404}),
    ("traversal under items", get(b"/api/items/1/../../../../etc/passwd"), {404}),
    ("asset traversal", get(b"/..%2fMakefile"), {404}),
    ("negative id", get(b"/api/items/-1"), {404}),
    ("id overflow", get(b"/api/items/99999999999999999999"), {404}),
    ("id leading zeros", get(b"/api/items/0001"), {404}),
    ("NUL in path", get(b"/api/items/1%00"), {404}),
    ("very long path", get(b"/" + b"a" * 5000), {404}),
    ("huge header", get(b"/", b"X-Big: " + b"a" * 100000 + b"\r\n"), {431}),
    ("Content-Length over the cap", post(b"/api/search", b"")[:-4].replace(b"Content-Length: 0", b"Content-Length: 99999999999") + b"\r\n\r\n", {413}),
    ("negative Content-Length", post(b"/api/search", b"").replace(b"Content-Length: 0", b"Content-Length: -1"), {400}),
    ("bad chunk size", b"POST /api/search HTTP/1.1\r\n" + H + JSON + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", {400}),
    ("Content-Length and chunked", b"POST /api/search HTTP/1.1\r\n" + H + JSON + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {400}),
    ("bad HTTP version", b"GET / HTTP/9.9\r\n" + H + b"\r\n", {505}),
    ("unknown method", get(b"/", method=b"FOO"), {405}),
    ("TRACE", get(b"/", method=b"TRACE"), {405}),
    ("OPTIONS without CORS", get(b"/api/search", method=b"OPTIONS"), {405}),
    ("JSON nested 1000 deep", post(b"/api/search", b"[" * 1000 + b"]" * 1000), {400}),
    ("JSON nested in a string is fine", post(b"/api/search", json.dumps({"text": "[" * 500, "k": 1}).encode()), {200}),
    ("JSON over 64 KiB", post(b"/api/search", json.dumps({"text": "a", "pad": "x" * 70000}).encode()), {413}),
    ("JSON with a NUL", post(b"/api/search", b'{"text": "a\x00b"}'), {400}),
    ("JSON with a \\u0000 escape", post(b"/api/search", b'{"text": "a dog\\u0000zz"}'), {400}),
    ("JSON with an escaped backslash then u0000", post(b"/api/search", b'{"text": "a\\\\u0000", "k": 1}'), {200}),
    ("JSON top-level array", post(b"/api/search", b'["text"]'), {400}),
    ("JSON truncated", post(b"/api/search", b'{"text": "a'), {400}),
    ("invalid UTF-8 text", post(b"/api/search", b'{"text": "\xff\xfe\xfd"}'), {400, 422}),
    ("query text over the cap", post(b"/api/search", json.dumps({"text": "word " * 1000}).encode()), {413}),
    ("k huge", post(b"/api/search", b'{"text": "a", "k": 1e12}'), {400}),
    ("k negative", post(b"/api/search", b'{"text": "a", "k": -5}'), {400}),
    ("k NaN-ish", post(b"/api/search", b'{"text": "a", "k": "nan"}'), {400}),
    ("nprobe zero", post(b"/api/search", b'{"text": "a", "index": "ivf", "nprobe": 0}'), {400}),
    ("17 filters", post(b"/api/search", json.dumps({"text": "a", "where": [f"f{i}=1" for i in range(17)]}).encode()), {400}),
    ("filter without a field", post(b"/api/search", b'{"text": "a", "where": ["=x"]}'), {400}),
    ("item id as a huge number", post(b"/api/search", b'{"item": 1e300}'), {400}),
    ("multipart without a boundary", post(b"/api/search", b"--x\r\n", b"Content-Type: multipart/form-data\r\n"), {400}),
    ("multipart boundary over 70", mpart(form([(b"text", None, b"a")], b"B" * 100), b"B" * 100), {400}),
    ("multipart unterminated", mpart(b"--XyZ\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nabc"), {400}),
    ("multipart 40 parts", mpart(form([(b"f%d" % i, None, b"1") for i in range(40)])), {400}),
    ("multipart part without a name", mpart(b"--XyZ\r\nContent-Type: text/plain\r\n\r\nabc\r\n--XyZ--\r\n"), {400}),
    ("multipart header block over the cap", mpart(b"--XyZ\r\nContent-Disposition: form-data; name=\"t\"\r\nX-Pad: " + b"p" * 5000 + b"\r\n\r\nabc\r\n--XyZ--\r\n"), {400}),
    ("multipart field over the text cap", mpart(form([(b"text", None, b"w" * 5000)])), {413}),
    ("upload that is not an image", mpart(form([(b"image", b"a.jpg", b"MZ\x90\x00 not an image")])), {422}),
    ("truncated JPEG", mpart(form([(b"image", b"a.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01")])), {422}),
    ("PNG claiming 100000 x 100000 pixels", mpart(form([(b"image", b"big.png", png_header(100000, 100000))])), {413, 422}),
    ("PNG claiming 0 x 0 pixels", mpart(form([(b"image", b"z.png", png_header(0, 0))])), {422}),
    ("two images", mpart(form([(b"image", b"a.jpg", b"x"), (b"image", b"b.jpg", b"y")])), {400}),
    ("delete without the token", get(b"/api/items/1", method=b"DELETE"), {401}),
    ("delete with a wrong token of the same length", get(b"/api/items/1", AUTH_BAD, b"DELETE"), {401}),
    ("add with the token plus one byte", post(b"/api/items", b'{"text": "x"}', JSON, AUTH_LONG), {401}),
    ("add with a Basic header", post(b"/api/items", b'{"text": "x"}', JSON, b"Authorization: Basic dXNlcjpwYXNz\r\n"), {401}),
    ("body on a GET", b"GET /api/stats HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nConnection: close\r\n\r\nabc", {400}),
    ("search with a GET", get(b"/api/search"), {405}),
    ("cross-origin request", get(b"/api/stats", b"Origin: http://evil.test\r\n"), {200}),
]


def test_at_least_30_hostile_requests():
    assert len(HOSTILE) >= 30


@pytest.fixture(scope="module")
def victim(base_db):
    s = Server(base_db, "--token", TOKEN, "--threads", "2")
    yield s
    rc, err = s.stop()
    assert rc == 0, err


def snapshot(s):
    st, stats = s.json("GET", "/api/stats")
    assert st == 200
    st, res = s.json("POST", "/api/search", {"text": "a red square", "k": 5})
    assert st == 200
    return stats, [(r["id"], r["score"]) for r in res["results"]]


def test_hostile_requests_then_consistent(victim):
    before = snapshot(victim)
    got = {}
    for name, raw, expect in HOSTILE:
        got[name] = victim.raw(raw)
    wrong = {n: (got[n], e) for n, r, e in HOSTILE if got[n] not in e}
    assert not wrong, wrong
    # no CORS header for a foreign origin
    st, hd, b = victim.request("GET", "/api/stats", headers={"Origin": "http://evil.test"})
    assert "Access-Control-Allow-Origin" not in hd
    # the server is up and nothing changed
    assert victim.proc.poll() is None
    assert victim.json("GET", "/healthz") == (200, {"status": "ok"})
    assert snapshot(victim) == before


def test_slow_client_does_not_block_others(victim):
    """A client that sends half a request and waits holds one connection,
    not the server."""
    slow = socket.create_connection((victim.host, victim.port), timeout=10)
    slow.sendall(b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"te")
    try:
        t0 = time.time()
        assert victim.json("GET", "/healthz")[0] == 200
        st, res = victim.json("POST", "/api/search", {"text": "x", "k": 1})
        assert st == 200 and time.time() - t0 < 10
    finally:
        slow.close()


def test_garbage_connection_is_dropped(victim):
    """Bytes that are not HTTP get no answer or a 400, and the server lives."""
    assert victim.raw(b"\x00\x01\x02\x03 garbage\r\n\r\n", timeout=3) in (0, 400)
    assert victim.json("GET", "/healthz")[0] == 200


def test_concurrent_searches_agree(victim):
    """Many threads at once get the same answers as one at a time."""
    ref = victim.json("POST", "/api/search", {"text": "blue", "k": 4})[1]["results"]
    out, errs = [], []

    def worker():
        try:
            for _ in range(5):
                st, res = victim.json("POST", "/api/search", {"text": "blue", "k": 4})
                out.append((st, res["results"]))
        except Exception as e:  # noqa: BLE001
            errs.append(e)
    th = [threading.Thread(target=worker) for _ in range(8)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    assert not errs and len(out) == 40
    assert all(st == 200 and r == ref for st, r in out)
