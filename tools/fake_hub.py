#!/usr/bin/python3
"""fake_hub.py: a small stand-in for huggingface.co on 127.0.0.1, for the tests
of `clipdb model fetch` (test time only; no network needed).

    /usr/bin/python3 tools/fake_hub.py ROOT [--port N]

Serves ROOT/<org>/<name>/<file> with Hugging Face's URL layout and prints the
port it listens on (first line of stdout), then serves until killed.

  HEAD/GET /<org>/<name>/resolve/main/<file>
      *.safetensors (LFS files on the hub): 302 to /cdn/<org>/<name>/<file>
      with X-Linked-Size, X-Linked-Etag ("<sha256>") and ETag, as the hub does;
      other files: served directly (200/206), ETag = a 40-hex git-like id.
  HEAD/GET /cdn/<org>/<name>/<file>
      the bytes, with Range support (206 + Content-Range; 416 past the end).
  GET /_control?reset=1&KEY=VALUE...
      sets fault switches (reset=1 clears them and the log first):
        status=N        answer N (e.g. 404, 500) on /resolve/ URLs
        drop_after=N    send N body bytes of a GET, then drop the connection
        stall_after=N   send N body bytes, then go silent (up to 30 s)
        ignore_range=1  answer Range requests with 200 and the whole file
        lie_size=D      announce size+D (X-Linked-Size and HEAD Content-Length);
                        GET bodies stay true
        lie_linked=D    announce size+D in X-Linked-Size only (the CDN's HEAD
                        Content-Length stays true)
        no_length=1     GET bodies without Content-Length (closed to end them)
        corrupt=1       flip one byte of every body (announced SHA-256 stays)
        no_linked=1     leave out X-Linked-Size and X-Linked-Etag
        fault_file=F    apply the faults only to files named F
  GET /_log
      JSON list of requests: {"method", "path", "range", "status"}.
"""
import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
FAULTS = {}
LOG = []
SHA_CACHE = {}
STOP = threading.Event()


def sha256_of(path):
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    with LOCK:
        if key in SHA_CACHE:
            return SHA_CACHE[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    with LOCK:
        SHA_CACHE[key] = h.hexdigest()
    return SHA_CACHE[key]


class Hub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-hub/1"
    root = "."

    def log_message(self, fmt, *args):  # quiet: the log is /_log
        pass

    def record(self, status):
        if self.path.startswith(("/_control", "/_log")):
            return
        with LOCK:
            LOG.append({"method": self.command, "path": self.path,
                        "range": self.headers.get("Range"), "status": status,
                        "user_agent": self.headers.get("User-Agent")})

    def faults_for(self, fname):
        with LOCK:
            f = dict(FAULTS)
        if f.get("fault_file") and f["fault_file"] != fname:
            return {}
        return f

    def plain(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.record(status)

    def do_HEAD(self):
        self.handle_any()

    def do_GET(self):
        self.handle_any()

    def handle_any(self):
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
        if parts == ["_control"]:
            q = urllib.parse.parse_qs(url.query)
            with LOCK:
                if "reset" in q:
                    FAULTS.clear()
                    LOG.clear()
                for k, v in q.items():
                    if k != "reset":
                        FAULTS[k] = v[0] if k == "fault_file" else int(v[0])
            return self.plain(200, b"ok\n")
        if parts == ["_log"]:
            with LOCK:
                body = json.dumps(LOG).encode()
            return self.plain(200, body, [("Content-Type", "application/json")])
        if len(parts) == 5 and parts[2:4] == ["resolve", "main"]:
            return self.resolve(parts[0], parts[1], parts[4])
        if len(parts) == 4 and parts[0] == "cdn":
            return self.serve(parts[1], parts[2], parts[3], cdn=True)
        return self.plain(404, b"Not Found\n")

    def path_of(self, org, name, fname):
        if any(p in ("", ".", "..") or "/" in p for p in (org, name, fname)):
            return None
        p = os.path.join(self.root, org, name, fname)
        return p if os.path.isfile(p) else None

    def resolve(self, org, name, fname):
        f = self.faults_for(fname)
        if f.get("status"):
            return self.plain(f["status"], b"Entry not found\n" if f["status"] == 404 else b"error\n")
        path = self.path_of(org, name, fname)
        if not path:
            return self.plain(404, b"Entry not found\n", [("X-Error-Code", "EntryNotFound")])
        if not fname.endswith(".safetensors"):
            return self.serve(org, name, fname, cdn=False)
        size = os.path.getsize(path) + f.get("lie_size", 0) + f.get("lie_linked", 0)
        sha = sha256_of(path)
        headers = [("Location", f"/cdn/{org}/{name}/{fname}"), ("ETag", f'"{sha}"')]
        if not f.get("no_linked"):
            headers += [("X-Linked-Size", str(size)), ("X-Linked-Etag", f'"{sha}"')]
        return self.plain(302, b"", headers)

    def serve(self, org, name, fname, cdn):
        f = self.faults_for(fname)
        path = self.path_of(org, name, fname)
        if not path:
            return self.plain(404, b"Not Found\n")
        with open(path, "rb") as fh:
            data = fh.read()
        if f.get("corrupt") and data:
            data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
        size = len(data)
        etag = f'"{sha256_of(path)}"' if cdn else f'"{hashlib.sha1(data).hexdigest()}"'
        headers = [("ETag", etag), ("Accept-Ranges", "bytes")]
        if self.command == "HEAD":
            return self.plain_head(200, size + f.get("lie_size", 0), headers)
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and not f.get("ignore_range") and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            if a.isdigit() and (b == "" or b.isdigit()):
                start = int(a)
                end = min(int(b), size - 1) if b else size - 1
                if start >= size or end < start:
                    return self.plain(416, b"", [("Content-Range", f"bytes */{size}")])
                data = data[start:end + 1]
                status = 206
                headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if f.get("no_length"):
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.record(status)
        cut = f.get("drop_after", f.get("stall_after"))
        if cut is not None and cut < len(data):
            self.wfile.write(data[:cut])
            self.wfile.flush()
            if "stall_after" in f:
                STOP.wait(30)
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        for i in range(0, len(data), 1 << 16):
            self.wfile.write(data[i:i + (1 << 16)])

    def plain_head(self, status, length, headers):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.record(status)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    Hub.root = args.root
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Hub)
    srv.daemon_threads = True
    print(srv.server_address[1], flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        STOP.set()
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
