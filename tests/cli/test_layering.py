"""The layering of the source tree (README "Dependencies point one way"):
no files include or call each other in a circle, and the README's module
table is exactly the set of module dependencies the code has, counted from
the #include lines and from the symbols each object file uses (nm), so a call
through the public header counts too. Needs the built objects
($CLIPDB_BUILD/src/*/*.o), no model and no shared data."""
import collections
import functools
import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("CLIPDB_BUILD", ROOT / "build"))
INCLUDE = re.compile(r'^\s*#\s*include\s+"([a-z_]+)/([A-Za-z0-9_.]+)"', re.M)

# File-level circles that another branch of issue 8 removes (tidy-store makes
# db.c tell the stored indexes about writes through one hook). Empty this set
# once it is merged; the test then forbids every circle.
KNOWN_FILE_CIRCLES = set()


def sources():
    return sorted(p for p in (ROOT / "src").glob("*/*") if p.suffix in (".c", ".h", ".cc", ".cu", ".cuh"))


def module(rel):
    return rel.split("/")[0]


@functools.lru_cache(maxsize=None)
def include_edges():
    """(file, file) edges of the #include lines, paths relative to src/."""
    edges = collections.defaultdict(set)
    for p in sources():
        rel = str(p.relative_to(ROOT / "src"))
        for mod, name in INCLUDE.findall(p.read_text(errors="replace")):
            if (ROOT / "src" / mod / name).exists():
                edges[rel].add(f"{mod}/{name}")
    return edges


@functools.lru_cache(maxsize=None)
def call_edges():
    """(file, file) edges: file a uses a global symbol that file b defines."""
    objs = sorted(BUILD.glob("src/*/*.o"))
    if not objs or not shutil.which("nm"):
        pytest.skip(f"no object files under {BUILD}/src (build first) or no nm")
    defined, used = {}, collections.defaultdict(set)
    for o in objs:
        rel = str(o.relative_to(BUILD / "src"))[:-2]
        src = next((rel + ext for ext in (".c", ".cc", ".cu") if (ROOT / "src" / (rel + ext)).exists()), None)
        if src is None:  # an object whose source is gone (stale build)
            continue
        out = subprocess.run(["nm", "-g", str(o)], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            f = line.split()
            if len(f) == 3 and f[1] in "TDBRVW":
                defined[f[2]] = src
            elif len(f) == 2 and f[0] == "U":
                used[src].add(f[1])
    edges = collections.defaultdict(set)
    for src, syms in used.items():
        for s in syms:
            if s in defined and defined[s] != src:
                edges[src].add(defined[s])
    return edges


def circles(edges):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]
    nodes = set(edges) | {b for bs in edges.values() for b in bs}

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def merged(*graphs):
    g = collections.defaultdict(set)
    for e in graphs:
        for a, bs in e.items():
            g[a] |= bs
    return g


def modules_of(edges):
    g = collections.defaultdict(set)
    for a, bs in edges.items():
        for b in bs:
            if module(a) != module(b):
                g[module(a)].add(module(b))
    return g


def readme_table():
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^    ([a-z]+)\s+->[ \t]*([a-z, ]*)$", text, re.M)
    assert rows, "README has no module table ('    MODULE -> A, B')"
    return {m: {d.strip() for d in deps.split(",") if d.strip()} for m, deps in rows}


def test_circles_finder_finds_circles():
    g = {"a/x.c": {"b/y.c"}, "b/y.c": {"c/z.c"}, "c/z.c": {"a/x.c"}, "d/w.c": {"a/x.c"}}
    assert circles(g) == [frozenset({"a/x.c", "b/y.c", "c/z.c"})]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_include_circles():
    assert circles(include_edges()) == []


def test_no_file_circles():
    found = set(circles(merged(include_edges(), call_edges())))
    assert found - KNOWN_FILE_CIRCLES == set(), sorted(map(sorted, found))


def test_no_module_circles():
    g = modules_of(merged(include_edges(), call_edges()))
    assert circles(g) == [], {m: sorted(d) for m, d in g.items()}


def test_readme_table_is_the_code():
    real = modules_of(merged(include_edges(), call_edges()))
    table = readme_table()
    mods = {module(str(p.relative_to(ROOT / "src"))) for p in sources()}
    assert set(table) == mods, f"README lists {sorted(table)}, src/ has {sorted(mods)}"
    for m in sorted(mods):
        assert real.get(m, set()) == table[m], \
            f"{m}: README says -> {sorted(table[m])}, the code uses {sorted(real.get(m, set()))}"
