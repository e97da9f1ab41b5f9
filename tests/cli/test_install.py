"""make install PREFIX=... installs the binary, the header, both libraries and
clipdb.pc; the shared library exports exactly the CLIPDB_API functions of
include/clipdb.h; examples/search.c builds against the installed tree through
pkg-config and runs. Needs no model and no shared data."""
import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("CLIPDB_BUILD", ROOT / "build"))

pytestmark = pytest.mark.skipif(
    os.environ.get("CLIPDB_ASAN") == "1",
    reason="make install links the plain build; under ASan the objects carry the sanitizer")


def public_functions():
    text = (ROOT / "include" / "clipdb.h").read_text()
    return set(re.findall(r"CLIPDB_API\b[^;(]*?\**\b(clipdb_\w+)\s*\(", text))


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    if not shutil.which("pkg-config"):
        pytest.skip("pkg-config absent (bash tools/install-deps.sh installs it)")
    pre = tmp_path_factory.mktemp("inst") / "usr"
    p = subprocess.run(["make", "-s", "install", f"PREFIX={pre}", f"BUILD={BUILD}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    return pre


def test_installed_files(prefix):
    for f in ("bin/clipdb", "include/clipdb.h", "lib/libclipdb.a", "lib/libclipdb.so",
              "lib/libclipdb.so.0", "lib/pkgconfig/clipdb.pc"):
        assert (prefix / f).exists(), f
    p = subprocess.run([str(prefix / "bin" / "clipdb"), "--version"], capture_output=True,
                       text=True)
    assert p.returncode == 0 and p.stdout.startswith("clipdb "), p.stderr


def test_shared_library_exports_only_the_public_api(prefix):
    out = subprocess.run(["nm", "-D", "--defined-only", str(prefix / "lib" / "libclipdb.so.0")],
                         capture_output=True, text=True, check=True).stdout
    exported = {l.split()[-1] for l in out.splitlines() if len(l.split()) == 3}
    assert exported, out
    assert {s for s in exported if not s.startswith("clipdb_")} == set()
    api = public_functions()
    assert len(api) > 40
    assert api == exported, (sorted(api - exported), sorted(exported - api))


def test_example_builds_against_installed_tree(prefix, tmp_path):
    env = dict(os.environ, PKG_CONFIG_PATH=str(prefix / "lib" / "pkgconfig"))
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "clipdb"], env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    assert f"-I{prefix}/include" in flags and "-lclipdb" in flags, flags
    exe = tmp_path / "search"
    cc = os.environ.get("CC", "cc")
    p = subprocess.run([cc, "-std=c11", "-Wall", "-Werror", str(ROOT / "examples" / "search.c"),
                        "-o", str(exe), *flags, f"-Wl,-rpath,{prefix}/lib"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    assert f"{prefix}/lib/libclipdb.so.0" in ldd, ldd
    bogus = tmp_path / "not.db"
    bogus.write_bytes(b"hello, not a database" * 100)
    p = subprocess.run([str(exe), str(bogus), "x"], capture_output=True, text=True)
    assert p.returncode == 1 and "not.db" in p.stderr, p.stderr
    p = subprocess.run([str(exe)], capture_output=True, text=True)
    assert p.returncode == 2 and "usage" in p.stderr
