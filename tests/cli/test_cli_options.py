"""The CLI's one option-value parser (src/cli/util.c): every command refuses a
bad number or --target the same way, exit 2 with a message naming the option
and the value, before touching any file. Needs no model and no shared data."""
import pytest

from conftest import run

BIG = "99999999999999999999999"  # overflows long long: errno must be checked

CASES = [
    (("search", "x.db", "--text", "a", "-k", "0"), "-k", "0"),
    (("search", "x.db", "--text", "a", "-k", "12abc"), "-k", "12abc"),
    (("search", "x.db", "--text", "a", "-k", BIG), "-k", BIG),
    (("search", "x.db", "--text", "a", "--nprobe", ""), "--nprobe", "''"),
    (("search", "x.db", "--item", "-3"), "--item", "-3"),
    (("search", "x.db", "--text", "a", "--target", "video"), "--target", "video"),
    (("index", "x.db", "--ivf", "--nlist", "0"), "--nlist", "0"),
    (("index", "x.db", "--ivf", "--seed", BIG), "--seed", BIG),
    (("index", "x.db", "--ivf", "--target", "images"), "--target", "images"),
    (("add", "x.db", "--texts", "t.txt", "--batch", "2000"), "--batch", "2000"),
    (("add", "x.db", "--texts", "t.txt", "--threads", "x"), "--threads", "x"),
    (("add", "x.db", "--texts", "t.txt", "--progress-every", "0"), "--progress-every", "0"),
    (("add", "x.db", "--texts", "t.txt", "--progress-every", "nan"), "--progress-every", "nan"),
    (("rm", "x.db", "4", "5x"), "item id", "5x"),
    (("rm", "x.db", BIG), "item id", BIG),
    (("model", "fetch", "a/b", "d", "--timeout", "0"), "--timeout", "0"),
    (("add", "x.db", "--images", "d", "--threads", "9"), "--threads", "9"),
    (("serve", "x.db", "--port", "65536"), "--port", "65536"),
    (("serve", "x.db", "--threads", BIG), "--threads", BIG),
    (("train", "--out", "d", "--epochs", "0"), "--epochs", "0"),
    (("train", "--out", "d", "--batch", "1x"), "--batch", "1x"),
    (("train", "--out", "d", "--val-max", "-1"), "--val-max", "-1"),
    (("finetune", "x.db", "--out", "d", "--lr", "-0.1"), "--lr", "-0.1"),
    (("finetune", "x.db", "--out", "d", "--warmup", BIG), "--warmup", BIG),
]


def inside(tmp_path, args):
    """The file arguments, made paths in tmp_path."""
    return [str(tmp_path / a) if a in ("x.db", "t.txt", "d") else a for a in args]


@pytest.mark.parametrize("args,opt,value", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_option_value_is_usage_error(tmp_path, args, opt, value):
    p = run(*inside(tmp_path, args))
    assert p.returncode == 2, (p.returncode, p.stderr)
    first = p.stderr.splitlines()[0]
    assert first.startswith(f"clipdb {args[0]}: "), first
    assert opt in first and value.strip("'") in first, first
    assert "try 'clipdb" in p.stderr
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_good_values_pass_the_parser(tmp_path):
    # parsing succeeds; the command then fails on the missing database (exit 1)
    p = run(*inside(tmp_path, ("search", "x.db", "--text", "a", "-k", "5", "--nprobe", "3",
                               "--target", "text")))
    assert p.returncode == 1, p.stderr
    p = run(*inside(tmp_path, ("index", "x.db", "--ivf", "--nlist", "4", "--seed", "7",
                               "--target", "text")))
    assert p.returncode == 1, p.stderr
