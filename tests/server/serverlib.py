"""Helpers of the server tests: the real `clipdb serve` on a free port of
127.0.0.1 (Server), raw and JSON/multipart requests, test images."""
import importlib.util
import json
import pathlib
import signal
import socket
import subprocess
import urllib.error
import urllib.request
import uuid

_spec = importlib.util.spec_from_file_location(
    "clipdb_tests_conftest", pathlib.Path(__file__).resolve().parent.parent / "conftest.py")
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)
BIN, ASAN, gen_model, run = _base.BIN, _base.ASAN, _base.gen_model, _base.run

TOKEN = "test-token-0123456789"
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 30), (20, 20, 20), (240, 240, 240)]


def make_images(folder, n=len(COLOURS)):
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    caps = []
    for i in range(n):
        im = Image.new("RGB", (96 + 8 * i, 72), COLOURS[i % len(COLOURS)])
        d = ImageDraw.Draw(im)
        d.rectangle([10 + i * 5, 10, 40 + i * 7, 50], fill=COLOURS[(i + 2) % len(COLOURS)])
        im.save(folder / f"photo{i}.jpg", quality=90)
        caps.append({"image": f"photo{i}.jpg", "captions": [f"photo number {i}", f"a picture of colour {i}"],
                     "split": "train" if i % 2 == 0 else "val"})
    return caps


class Server:
    def __init__(self, db, *args):
        self.proc = subprocess.Popen([BIN, "serve", str(db), "--port", "0", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("clipdb serve: http://"):
            err = self.proc.stderr.read()
            self.proc.wait(timeout=10)
            raise AssertionError(f"server did not start: {line!r} {err}")
        self.url = line.split()[2].rstrip("/")
        self.host, self.port = self.url[len("http://"):].split(":")
        self.port = int(self.port)

    def request(self, method, path, body=None, headers=None, timeout=30):
        """Returns (status, headers, body bytes)."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def json(self, method, path, obj=None, headers=None):
        h = dict(headers or {})
        body = None
        if obj is not None:
            body = json.dumps(obj).encode()
            h.setdefault("Content-Type", "application/json")
        st, hd, b = self.request(method, path, body, h)
        return st, json.loads(b) if b else None

    def form(self, path, fields=(), files=(), headers=None):
        """multipart/form-data: fields [(name, value)], files [(name, filename, bytes)]."""
        boundary = "----clipdbtest" + uuid.uuid4().hex
        out = b""
        for k, v in fields:
            out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n").encode()
        for k, fn, data in files:
            out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{fn}\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
        out += f"--{boundary}--\r\n".encode()
        h = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        h.update(headers or {})
        st, hd, b = self.request("POST", path, out, h)
        return st, json.loads(b) if b and hd.get("Content-Type", "").startswith("application/json") else b

    def raw(self, data, timeout=10):
        """Sends raw bytes; returns the status code of the answer (0: closed without one)."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            s.sendall(data)
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            buf = b""
            try:
                while b"\r\n" not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
            except (ConnectionResetError, socket.timeout):
                pass
        if not buf.startswith(b"HTTP/1."):
            return 0
        return int(buf.split(b" ", 2)[1])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("server did not stop on SIGTERM")
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        assert "Sanitizer" not in err and "runtime error" not in err, err
        return self.proc.returncode, err


