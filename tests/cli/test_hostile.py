"""The hostile-input corpus (tests/hostile/cases.json), end to end.

Each case names the files and folders to make (recipes below), the clipdb
command line, and what must come out: the exit status, substrings of
stderr (and stdout), whether stdout must be valid JSON, and a time limit
(a case that hangs fails at its timeout instead of blocking the run).
Every case runs in a fresh directory with a fresh copy of a small database
({db}: 4 images with captions made here, and 2 texts) built with a seeded
random model ({model}).

Recipes (the "setup" list, in order; NAME is relative to the case folder):
  fifo:NAME              a named pipe (nobody writes to it)
  text:NAME=TEXT         a file holding TEXT (escapes are JSON's own)
  hex:NAME=HEX           a file holding those bytes
  repeat:NAME=N=LINE     a file of N copies of the line LINE
  copy:NAME=CORPUSFILE   a copy of tests/hostile/CORPUSFILE
  dir:NAME               a folder
  png:NAME               a small valid PNG (distinct content per name)
  symlink:NAME=TARGET    a symbolic link to TARGET (as written)
  chmod:NAME=OCTAL       permissions
  model:NAME             a copy of the model directory
  sql:STATEMENT          run on the case's database ({db}) with Python's sqlite3
  cut:NAME=PERCENT       cut that share of the file's bytes off its end
                         (to make an older or damaged database)
Placeholders in args: {db} {model} {tmp} (the case folder).

"as_nobody": true runs the command as user nobody (uid 65534) with the case
folder (made under /tmp, owned by nobody after the setup) so that
permissions bite even when the tests run as root.
"""
import json
import re
import os
import pathlib
import resource
import shutil
import sqlite3
import subprocess
import tempfile

import pytest
from PIL import Image

from conftest import ASAN, BIN, ROOT, gen_model, run

CORPUS = ROOT / "tests" / "hostile"
NOBODY = 65534
CASES = json.loads((CORPUS / "cases.json").read_text())


@pytest.fixture(scope="module")
def model(tmp_path_factory, shared):
    return gen_model(tmp_path_factory.mktemp("hostile") / "tiny", seed=3)


def make_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24 + seed % 7, 20), ((seed * 53) % 256, (seed * 97) % 256, 40)).save(path)


@pytest.fixture(scope="module")
def base_db(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("hostile-db")
    imgs = d / "images"
    for i in range(4):
        make_png(imgs / f"img{i}.png", i + 1)
    with open(d / "captions.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"image": f"img{i}.png",
                                "captions": [f"a picture number {i}", f"another view {i}"]}) + "\n")
    (d / "texts.txt").write_text("a red square\na blue circle\n")
    db = d / "base.db"
    run("init", db, "--model", model, check=True)
    run("add", db, "--images", imgs, "--captions", d / "captions.jsonl", "-q", check=True)
    run("add", db, "--texts", d / "texts.txt", "-q", check=True)
    return db


def make_case_files(case_dir, recipes, model_dir):
    seed = 100
    for r in recipes:
        kind, rest = r.split(":", 1)
        name, _, val = rest.partition("=")
        p = case_dir / name
        if kind in ("fifo", "text", "hex", "repeat", "copy", "png", "symlink"):
            p.parent.mkdir(parents=True, exist_ok=True)
        if kind == "fifo":
            os.mkfifo(p)
        elif kind == "text":
            p.write_text(val)
        elif kind == "repeat":
            count, _, line = val.partition("=")
            p.write_text((line + "\n") * int(count))
        elif kind == "hex":
            p.write_bytes(bytes.fromhex(val))
        elif kind == "copy":
            shutil.copy(CORPUS / val, p)
        elif kind == "dir":
            p.mkdir(parents=True, exist_ok=True)
        elif kind == "png":
            seed += 1
            make_png(p, seed)
        elif kind == "symlink":
            os.symlink(val, p)
        elif kind == "chmod":
            os.chmod(p, int(val, 8))
        elif kind == "model":
            shutil.copytree(model_dir, p)
        elif kind == "cut":
            data = p.read_bytes()
            p.write_bytes(data[: len(data) - max(1, len(data) * int(val) // 100)])
        elif kind == "sql":
            with sqlite3.connect(case_dir / "t.db") as con:
                con.execute(rest)
            con.close()
        else:
            raise ValueError(f"unknown recipe {r}")


def check_json(text):
    """Strict JSON: no bare inf/nan, no duplicate keys in any object."""
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f"duplicate keys in {keys}"
        return dict(pairs)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"),
               object_pairs_hook=no_duplicates)


def restore_permissions(case_dir):
    for root, dirs, _ in os.walk(case_dir):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_hostile(case, tmp_path, model, base_db, request):
    if case.get("rlimit_as_mb") and ASAN:
        pytest.skip("AddressSanitizer reserves terabytes of shadow memory: no address-space "
                    "limit is possible under make asan (the plain build runs this case)")
    nobody = case.get("as_nobody") and os.geteuid() == 0
    if nobody:
        # a folder nobody can reach (pytest's own is private to root)
        cdir = pathlib.Path(tempfile.mkdtemp(prefix="clipdb-hostile-"))
        os.chmod(cdir, 0o755)
        request.addfinalizer(lambda: shutil.rmtree(cdir, ignore_errors=True))
    else:
        cdir = tmp_path / "case"
        cdir.mkdir()
    db = cdir / "t.db"
    shutil.copy(base_db, db)
    make_case_files(cdir, case.get("setup", []), model)
    if nobody:
        for root, dirs, files in os.walk(cdir):
            for nm in dirs + files:
                os.lchown(os.path.join(root, nm), NOBODY, NOBODY)
        os.lchown(cdir, NOBODY, NOBODY)
    args = [a.format(db=db, model=model, tmp=cdir) for a in case["args"]]
    limit = case.get("rlimit_as_mb")

    def preexec():
        if nobody:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit << 20, limit << 20))
    try:
        p = subprocess.run([BIN, *args], capture_output=True,
                           timeout=case.get("timeout", 60), preexec_fn=preexec)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case['name']}: clipdb {' '.join(args)} did not finish in "
                    f"{case.get('timeout', 60)} s")
    finally:
        restore_permissions(cdir)
    # stdout must be valid UTF-8 (invalid bytes of stored names are replaced)
    p.stdout = p.stdout.decode("utf-8")
    p.stderr = p.stderr.decode("utf-8", errors="replace")
    assert p.returncode == case["rc"], (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    for needle in case.get("stderr", []):
        assert needle.format(tmp=cdir) in p.stderr, (needle, p.stderr[-2000:])
    for needle in case.get("stdout", []):
        assert needle.format(tmp=cdir) in p.stdout, (needle, p.stdout[-2000:])
    if "max_stderr_lines" in case:
        assert len(p.stderr.splitlines()) <= case["max_stderr_lines"], p.stderr
    if "stdout_lines" in case:
        assert len(p.stdout.splitlines()) == case["stdout_lines"], p.stdout
    if case.get("json"):
        check_json(p.stdout)
    assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr
    for check in case.get("after", []):
        restore_permissions(cdir)
        q = subprocess.run([BIN, *[a.format(db=db, model=model, tmp=cdir) for a in check["args"]]],
                           capture_output=True, timeout=60)
        out = q.stdout.decode("utf-8")  # valid UTF-8 whatever bytes are stored
        assert q.returncode == check.get("rc", 0), (check, q.stderr)
        for needle in check.get("stdout", []):
            assert needle in out, (needle, out)
        if check.get("json"):
            check_json(out)
        if check.get("plain_records"):
            # search's plain output: one "N. SCORE  #ID NAME" record per line
            for line in out.splitlines():
                assert re.match(r"^ *\d+\. +\S+ +#\d+ ", line), (line, out)
