"""Faiss builds run in a child process (src/store/sindex_faiss.c, issue 9).

The factory-string grammar keeps the strings Faiss is known to crash on away
from it; every accepted string still meets data at the edges of its
parameters (IVF lists = vectors, 16-bit PQ codes with a handful of vectors,
OPQ/PCA at the full dimension, HNSW 2 and 256, databases of 1-3 vectors).
Whatever Faiss makes of them, `clipdb index --faiss` must exit 0 (and the
index then answers a search) or fail with one clear line, never crash, and a
failure leaves the database as it was. The crash path itself is driven by
the fault hook CLIPDB_FAULT_FAISS_BUILD, which only the build child honours.
"""
import sqlite3

import pytest

from conftest import ASAN, gen_model, one_line_failure, run

D = 32  # the tiny model's embedding dimension (checked below)
METRICS = ["cosine", "l2", "dot"]
# accepted strings at the edges; {n}: the number of vectors, {d}: the dimension
SPECS = [
    "Flat", "HNSW2", "HNSW256", "HNSW2,Flat", "HNSW256,Flat",
    "IVF1,Flat", "IVF{n},Flat", "IVF{n},PQ1", "IVF{n},PQ{d}x16", "IVF1,PQ2x1", "IVF{n},SQ4",
    "IVF{n},SQfp16", "IVF1,SQ8",
    "PQ1", "PQ1x1", "PQ{d}", "PQ{d}x16", "PQ1x16", "PQ4x16", "PQ{d}x1",
    "SQ8", "SQ4", "SQfp16",
    "PCA1,Flat", "PCA{d},Flat", "PCAR1,HNSW2", "PCA{d},IVF{n},Flat", "PCA1,PQ1x16",
    "PCAR{d},SQ4", "PCA2,IVF{n},PQ2x16",
    "OPQ1,Flat", "OPQ{d},PQ{d}", "OPQ1_1,PQ1", "OPQ{d}_{d},PQ{d}x16", "OPQ2_4,IVF{n},PQ2",
    "OPQ1_{d},HNSW2",
    "L2norm,Flat", "L2norm,L2norm,HNSW256", "L2norm,PCA1,IVF1,SQ8", "PCA{d},OPQ4,PQ4x1",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return gen_model(tmp_path_factory.mktemp("fb") / "tiny", seed=5)


def clear_failure(p, cmd, needle):
    """one_line_failure, after the lines Faiss's k-means prints itself on
    stderr about few training points (advice, not errors)."""
    p.stderr = "".join(x for x in p.stderr.splitlines(True) if not x.startswith("WARNING clustering"))
    return one_line_failure(p, cmd, needle)


def dump(db):
    """Every row of the database, in order (the file itself may be rewritten
    by SQLite without a change of content)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = list(con.iterdump())
    con.close()
    return rows


@pytest.fixture(scope="module")
def dbs(tmp_path_factory, model):
    """Databases of 1, 2 and 3 texts and one of 40 (every text differs)."""
    root = tmp_path_factory.mktemp("fbdb")
    out = {}
    for n in (1, 2, 3, 40):
        db = root / f"n{n}.db"
        run("init", db, "--model", model, check=True)
        (root / f"t{n}.txt").write_text("".join(f"text {i} of {n}, a photo\n" for i in range(n)))
        run("add", db, "--texts", root / f"t{n}.txt", "-q", check=True)
        out[n] = db
    return out


def test_tiny_model_dimension(dbs):
    con = sqlite3.connect(f"file:{dbs[1]}?mode=ro", uri=True)
    blob = con.execute("SELECT vec FROM vectors_text").fetchone()[0]
    con.close()
    assert len(blob) == 4 * D


@pytest.mark.parametrize("n", [1, 2, 3, 40])
def test_accepted_strings_at_their_edges_never_crash(dbs, n):
    failures = []
    # under ASan (several times slower) every other string per size, so that
    # each string still meets two of the four sizes
    specs = list(enumerate(SPECS))[n % 2::2] if ASAN else list(enumerate(SPECS))
    for i, spec in specs:
        spec = spec.format(n=n, d=D)
        metric = METRICS[(i + n) % 3]  # every string meets each metric over the sizes
        db = dbs[n]
        before = dump(db)
        p = run("index", db, "--faiss", spec, "--target", "text", "--metric", metric)
        if p.returncode == 0:
            s = run("search", db, "--item", 1, "--index", "faiss", "--target", "text",
                    "--metric", metric, "-k", "3")
            if s.returncode != 0 or "Sanitizer" in s.stderr:
                failures.append((spec, metric, "search after a build", s.returncode, s.stderr))
            continue
        # Faiss's k-means warns on stderr about few training points: not an error line
        lines = [x for x in p.stderr.strip().splitlines() if not x.startswith("WARNING clustering")]
        if p.returncode != 1 or len(lines) != 1 or not lines[0].startswith("clipdb index: ") \
                or "Sanitizer" in p.stderr or "crashed" in p.stderr:
            failures.append((spec, metric, p.returncode, p.stderr))
        elif dump(db) != before:
            failures.append((spec, metric, "database changed by a failed build", lines[0]))
    assert failures == [], failures


@pytest.mark.parametrize("fault,needle", [
    ("signal", "Faiss crashed building 'IVF2,Flat' (signal 11: Segmentation fault); "
               "nothing was stored"),
    ("exit", "Faiss failed building 'IVF2,Flat' (its process exited with status 3); "
             "nothing was stored"),
    ("short", "the build process sent fewer index bytes than it announced; nothing was stored"),
    ("big", "the build process sent an index larger than a database value holds"),
])
def test_a_crashing_build_is_a_clear_error_and_changes_nothing(dbs, fault, needle):
    db = dbs[40]
    run("index", db, "--faiss", "Flat", "--target", "text", check=True)
    before = dump(db)
    p = run("index", db, "--faiss", "IVF2,Flat", "--target", "text",
            env={"CLIPDB_FAULT_FAISS_BUILD": fault})
    clear_failure(p, "index", needle)
    assert dump(db) == before
    # the stored index is the earlier one, and it still answers
    s = run("stats", db, "--json", check=True).stdout
    assert '"factory": "Flat"' in s or '"factory":"Flat"' in s, s
    run("search", db, "--text", "a photo", "--index", "faiss", "--target", "text", check=True)
    # a search that builds its Faiss index in memory fails the same way, clearly
    p = run("search", db, "--text", "a photo", "--faiss", "IVF2,Flat", "--target", "text",
            env={"CLIPDB_FAULT_FAISS_BUILD": fault})
    clear_failure(p, "search", needle)


def test_the_fault_hook_is_the_childs_only(dbs):
    """Set for a search of a stored index (no build): nothing happens."""
    db = dbs[3]
    run("index", db, "--faiss", "Flat", "--target", "text", check=True)
    p = run("search", db, "--text", "a photo", "--index", "faiss", "--target", "text",
            env={"CLIPDB_FAULT_FAISS_BUILD": "signal"})
    assert p.returncode == 0, p.stderr


def test_rebuild_at_search_time_runs_in_the_child(dbs, tmp_path):
    """A stored HNSW index cannot remove a deleted item: a search rebuilds it
    from the stored vectors, and that build also runs in the child."""
    db = dbs[40]
    run("index", db, "--faiss", "HNSW8", "--target", "text", check=True)
    run("rm", db, "1", check=True)
    ok = run("search", db, "--text", "a photo", "--index", "faiss", "--target", "text", "-k", "50",
             "--json", check=True)
    assert '"id": 1,' not in ok.stdout and '"id":1,' not in ok.stdout
    p = run("search", db, "--text", "a photo", "--index", "faiss", "--target", "text",
            env={"CLIPDB_FAULT_FAISS_BUILD": "signal"})
    clear_failure(p, "search", "Faiss crashed building 'HNSW8' (signal 11")
