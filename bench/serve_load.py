#!/usr/bin/env python3
"""Load benchmark of `clipdb serve` (not a test): wrk, 64 connections, 60 s of
mixed traffic (40% text searches with encoding, 40% item searches, 20%
thumbnails), with images and texts ingested through the API at the same time.

Reports: zero errors expected; p50/p99 latency; throughput against the same
searches run one at a time through the library (build/bench/bench_serve_lib);
RSS at the end against RSS after the warm-up (within 10% expected); the
ingested items all present. Prints the CPU model and ISA. Exits 1 if a check
fails.

usage: bench/serve_load.py [DB] (default .cache/demo/coco.db, from `make demo`;
the database is copied, the original is not written)
env: CLIPDB_BIN, LOAD_SECONDS (60), LOAD_CONNECTIONS (64), LOAD_THREADS (server
workers, 4), WARMUP_SECONDS (30), LIB_SECONDS (30), INGEST_CLIENTS (4)
"""
import io
import json
import os
import pathlib
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = os.environ.get("CLIPDB_BIN", str(ROOT / "build" / "clipdb"))
LIB = ROOT / "build" / "bench" / "bench_serve_lib"
SECONDS = int(os.environ.get("LOAD_SECONDS", 60))
CONNS = int(os.environ.get("LOAD_CONNECTIONS", 64))
THREADS = int(os.environ.get("LOAD_THREADS", 4))
WARMUP = int(os.environ.get("WARMUP_SECONDS", 30))
LIB_SECONDS = int(os.environ.get("LIB_SECONDS", 30))
TOKEN = "bench-token-0123456789"
TEXTS = ["a dog catching a frisbee", "two people riding horses on a beach", "a red bus in a street",
         "a plate of food on a table", "a cat sleeping on a sofa", "a man surfing a wave",
         "a kitchen with a stove", "children playing football", "a train at a station",
         "a bowl of fruit", "a group of people with umbrellas", "a giraffe near trees"]


def cpu_info():
    model, flags = "?", set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name") and model == "?":
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_tile"] if f in flags]
    return model, platform.machine() + " " + " ".join(isa), os.cpu_count()


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def call(url, method, path, obj=None, data=None, headers=None):
    h = dict(headers or {})
    if obj is not None:
        data = json.dumps(obj).encode()
        h["Content-Type"] = "application/json"
    req = urllib.request.Request(url + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def lua_script(texts, items, images):
    q = lambda s: '"' + s.replace('"', '\\"') + '"'  # noqa: E731
    return f"""
local texts = {{{", ".join(q(t) for t in texts)}}}
local items = {{{", ".join(str(i) for i in items)}}}
local images = {{{", ".join(str(i) for i in images)}}}
local hdr = {{["Content-Type"] = "application/json"}}
init = function(args) math.randomseed(os.time() + tonumber(tostring({{}}):sub(8), 16)) end
request = function()
  local r = math.random(10)
  if r <= 4 then
    return wrk.format("POST", "/api/search", hdr,
      '{{"text": "' .. texts[math.random(#texts)] .. '", "k": 10}}')
  elseif r <= 8 then
    return wrk.format("POST", "/api/search", hdr,
      '{{"item": ' .. items[math.random(#items)] .. ', "k": 10}}')
  else
    return wrk.format("GET", "/api/items/" .. images[math.random(#images)] .. "/thumb")
  end
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT requests=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d " ..
    "status=%d connect=%d read=%d write=%d timeout=%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), summary.errors.status,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
end
"""


def wrk(url, script, seconds):
    p = subprocess.run(["wrk", "-t", "4", "-c", str(CONNS), "-d", f"{seconds}s", "--timeout", "30s",
                        "-s", script, url], capture_output=True, text=True)
    m = re.search(r"RESULT (.*)", p.stdout)
    if not m:
        raise SystemExit(f"wrk failed:\n{p.stdout}\n{p.stderr}")
    return {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}, p.stdout


def main():
    src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / ".cache" / "demo" / "coco.db")
    if not src.is_file():
        raise SystemExit(f"{src}: no database (run `CLIPDB_DEMO_SERVE=0 make demo` first)")
    subprocess.run(["make", "-s", "-j2", str(LIB.relative_to(ROOT))], cwd=ROOT, check=True)
    model, isa, ncpu = cpu_info()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="clipdb-load-"))
    ok = True
    try:
        db = tmp / "load.db"
        shutil.copy(src, db)
        srv = subprocess.Popen([BIN, "serve", str(db), "--port", "0", "--token", TOKEN, "--threads",
                                str(THREADS), "--quiet"], stdout=subprocess.PIPE, text=True)
        url = srv.stdout.readline().split()[2].rstrip("/")
        st, body = call(url, "GET", "/api/stats")
        stats0 = json.loads(body)
        st, body = call(url, "POST", "/api/search", {"text": "a photo", "k": 1000})
        images = [r["id"] for r in json.loads(body)["results"]]
        st, body = call(url, "POST", "/api/search", {"text": "a photo", "k": 1000, "target": "text"})
        captions = [r["id"] for r in json.loads(body)["results"]]
        rng = random.Random(7)
        items = rng.sample(images, min(100, len(images))) + rng.sample(captions, min(100, len(captions)))
        script = tmp / "mix.lua"
        script.write_text(lua_script(TEXTS, items, images))
        (tmp / "queries.txt").write_text("".join(f"text:{t}\nitem:{items[i]}\n" for i, t in enumerate(TEXTS)))

        print(f"CPU: {model} ({ncpu} CPUs), ISA: {isa}")
        print(f"database: {src} ({stats0['images']} images, {stats0['texts']} texts, model {stats0['model']})")
        print(f"server: {THREADS} worker threads; load: wrk 4 threads, {CONNS} connections")

        # ingest through the API while the load runs: INGEST_CLIENTS clients,
        # each adding an image (with a caption) or a text, one after the other,
        # until the load ends
        photos = sorted((ROOT.parent / "shared" / "data" / "coco-subset" / "images").glob("*.jpg"))[:10]
        added, ingest_errors = [], []
        lock = threading.Lock()
        stop = threading.Event()

        def upload(i):
            from PIL import Image
            auth = {"Authorization": f"Bearer {TOKEN}"}
            if i % 2 == 0 and photos:
                im = Image.open(photos[i // 2 % len(photos)]).convert("RGB")
                im.putpixel((0, 0), (i % 256, 255 - i % 256, i // 256 % 256))  # a new file each time
                buf = io.BytesIO()
                im.save(buf, "PNG")
                b = "----bench" + str(i)
                data = (f"--{b}\r\nContent-Disposition: form-data; name=\"caption\"\r\n\r\n"
                        f"an uploaded bench photo {i}\r\n--{b}\r\nContent-Disposition: form-data; "
                        f"name=\"image\"; filename=\"u{i}.png\"\r\n\r\n").encode() + buf.getvalue() + \
                    f"\r\n--{b}--\r\n".encode()
                st, body = call(url, "POST", "/api/items", data=data,
                                headers=dict(auth, **{"Content-Type": f"multipart/form-data; boundary={b}"}))
            else:
                st, body = call(url, "POST", "/api/items", {"text": f"a text ingested under load {i}"},
                                headers=auth)
            with lock:
                if st != 201:
                    ingest_errors.append((st, body[:200]))
                else:
                    added.append(json.loads(body))

        def ingest(first, step):
            i = first
            while not stop.is_set():
                upload(i)
                i += step
        n_clients = int(os.environ.get("INGEST_CLIENTS", 4))
        # the warm-up covers the write path too
        wu = [threading.Thread(target=upload, args=(1000000 + j,)) for j in range(2)]
        for t in wu:
            t.start()
        warm, _ = wrk(url, str(script), WARMUP)
        for t in wu:
            t.join()
        rss_warm = rss_kib(srv.pid)
        th = [threading.Thread(target=ingest, args=(j, n_clients)) for j in range(n_clients)]
        for t in th:
            t.start()
        main_run, raw = wrk(url, str(script), SECONDS)
        stop.set()
        for t in th:
            t.join()
        rss_end = rss_kib(srv.pid)
        # every ingested item is there
        st, body = call(url, "GET", "/api/stats")
        stats1 = json.loads(body)
        missing = [a["id"] for a in added if call(url, "GET", f"/api/items/{a['id']}")[0] != 200]
        n_img = sum(a["type"] == "image" for a in added)
        n_txt = sum(a["type"] == "text" for a in added)
        counts_ok = (stats1["images"] - stats0["images"] == n_img and
                     stats1["texts"] - stats0["texts"] == n_txt + sum(a["captions"] for a in added))
        srv.send_signal(signal.SIGTERM)
        srv.wait(timeout=60)

        # the same searches one at a time through the library
        p = subprocess.run([str(LIB), str(src), str(tmp / "queries.txt"), str(LIB_SECONDS)],
                           capture_output=True, text=True)
        m = re.search(r"RESULT (.*)", p.stdout)
        if not m:
            raise SystemExit(f"bench_serve_lib failed: {p.stderr}")
        lib = {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())}

        r = main_run
        secs = r["duration_us"] / 1e6
        rps = r["requests"] / secs
        errors = r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
        searches_ps = rps * 0.8  # 80% of the mix are searches
        print()
        print(f"{'':34} {'value':>12}")
        print(f"{'requests (60 s main run)':34} {r['requests']:>12}")
        print(f"{'errors (non-2xx, socket, timeout)':34} {errors:>12}")
        print(f"{'requests/s (all kinds)':34} {rps:>12.1f}")
        print(f"{'latency p50 / p90 / p99 (ms)':34} {r['p50_us']/1e3:>6.1f} / {r['p90_us']/1e3:.1f} / {r['p99_us']/1e3:.1f}")
        print(f"{'searches/s through the server':34} {searches_ps:>12.1f}  (80% of requests)")
        print(f"{'searches/s, library, one at a time':34} {lib['per_s']:>12.1f}  (p50 {lib['p50_ms']:.1f} ms, p99 {lib['p99_ms']:.1f} ms)")
        print(f"{'ratio server / library':34} {searches_ps / lib['per_s']:>12.2f}")
        print(f"{'RSS after warm-up (MiB)':34} {rss_warm/1024:>12.1f}")
        print(f"{'RSS at the end (MiB)':34} {rss_end/1024:>12.1f}  ({100*(rss_end-rss_warm)/rss_warm:+.1f}%)")
        print(f"{'ingested under load':34} {len(added):>12}  ({n_img} images, {n_txt} texts; "
              f"{len(ingest_errors)} errors, {len(missing)} missing, counts {'ok' if counts_ok else 'WRONG'})")
        print(f"warm-up: {warm['requests']} requests in {warm['duration_us']/1e6:.1f} s")
        checks = {"zero errors": errors == 0, "RSS within 10%": rss_end <= rss_warm * 1.10,
                  "ingest: no error": not ingest_errors, "ingest: no lost item": not missing and counts_ok}
        for k, v in checks.items():
            print(f"check: {k}: {'ok' if v else 'FAILED'}")
        ok = all(checks.values())
        if ingest_errors:
            print("ingest errors:", ingest_errors[:3])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
