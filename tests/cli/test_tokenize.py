"""Black-box tests of `clipdb tokenize` against tools/ref_tokenizer.py, an
independent Python implementation of the reference algorithm."""
import json
import random
import sys

import pytest

from conftest import ROOT, run

sys.path.insert(0, str(ROOT / "tools"))
import ref_tokenizer  # noqa: E402

TRICKY = [
    "a photo of a cat",
    "A &amp; B &lt;tag&gt; &amp;amp; &amplifier &notit; &notin; &#39;x&#x27; &#0; &#128; &#xD800; &#1114112;",
    "&AElig &AEligx &eacute;t&eacute; &#9731;&#x1F600; &; &#; &#x; &abcdefghijklmnopqrstuvwxyzabcdefghij;",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m \u00df STRASSE",
    "\u5317\u4eac\u7684\u732b \u3053\u3093\u306b\u3061\u306f \ud55c\uad6d\uc5b4 \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "emoji \U0001F600\U0001F469\u200D\U0001F4BB \u2764\ufe0f \U0001F1FA\U0001F1F8",
    "digits 12345 3.14159 \u0661\u0662\u0663 \u2160\u2161 \u00bd",
    "apostrophes: don't it's we're I've I'm you'll he'd 'LL 'S 'Re rock'n'roll",
    "mixed\twhitespace\r\x0b\x0c\x85\u00a0\u2003\u3000\u2028end\x1c\x1f \x1c",
    "don't", "'LL", "\u0130stanbul", "\u0130STANBUL \u0131\u0130",
    "\u039f\u0394\u039f\u03a3 \u03a3 \u0391\u03a3. \u0391\u03a3\u0391 \u00aa\u03a3 A\u0301\u03a3 \u03a3\u0345",
    "<|startoftext|>hello<|endoftext|> <|ENDOFTEXT|> <|\u017ftartoftext|> '\u017f <|startoftext|",
    "\u212a Kelvin \u0345 a\u0345b \u1e9e \ufb03 \u01c5",
    "   leading and trailing   ",
    "!!!??? ... ,,, --- ___ *** ### $$$ %%% ^^^ ~~~ ```",
    "x" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


@pytest.fixture(scope="session")
def ref(bpe_vocab):
    return ref_tokenizer.Tokenizer(str(bpe_vocab))


def model_dir(bpe_vocab):
    return bpe_vocab.parent


def ref_lines(ref, texts, truncate=True):
    out = []
    for t in texts:
        try:
            out.append(json.dumps(ref.tokenize(t, 77, truncate), separators=(",", ":")))
        except ValueError as e:
            out.append("error: " + str(e))
    return out


def clipdb_lines(mdir, texts, truncate=True):
    args = ["tokenize", "--model", mdir] + (["--truncate"] if truncate else []) + ["-"]
    p = run(*args, input="".join(t + "\n" for t in texts), check=True)
    return p.stdout.splitlines()


def all_captions(shared):
    caps = []
    for name in ("coco-subset", "flickr8k"):
        with open(shared / "data" / name / "captions.jsonl", encoding="utf-8") as f:
            for line in f:
                # one text per line on stdin: a newline inside a caption is
                # whitespace to the tokenizer anyway
                caps += [c.replace("\n", " ") for c in json.loads(line)["captions"]]
    return caps


def test_published_ids(bpe_vocab):
    p = run("tokenize", "--model", model_dir(bpe_vocab), "a photo of a cat", "a photo of a dog", check=True)
    assert p.stdout.splitlines() == ["[49406,320,1125,539,320,2368,49407]",
                                     "[49406,320,1125,539,320,1929,49407]"]


def test_all_captions_match_reference(shared, bpe_vocab, ref):
    caps = all_captions(shared)
    assert len(caps) > 40000
    got = clipdb_lines(model_dir(bpe_vocab), caps)
    want = ref_lines(ref, caps)
    bad = [(c, g, w) for c, g, w in zip(caps, got, want) if g != w]
    print(f"compared {len(caps)} captions; {len(caps) - len(bad)} matched")
    assert len(got) == len(caps)
    assert not bad, bad[:5]


def test_tricky_strings_match_reference(bpe_vocab, ref):
    got = clipdb_lines(model_dir(bpe_vocab), TRICKY)
    assert got == ref_lines(ref, TRICKY)


def test_code_points_match_reference(bpe_vocab, ref):
    # Every code point below U+3000 and a sample above, in contexts that
    # exercise the split classes, lower-casing and the final-sigma rule.
    # (Code points new in Unicode 15, which utf8proc knows and Python 3.11
    # does not, are left out.)
    import unicodedata
    cps = list(range(1, 0x3000)) + list(range(0x3000, 0x110000, 97))
    texts = []
    for c in cps:
        if c == 10 or 0xD800 <= c < 0xE000 or unicodedata.category(chr(c)) == "Cn":
            continue
        ch = chr(c)
        texts.append(f"a{ch}b {ch}\u03a3 a{ch}\u03a3 a\u03a3{ch} {ch}{ch}1{ch}'s{ch}")
    assert clipdb_lines(model_dir(bpe_vocab), texts) == ref_lines(ref, texts)


def test_long_random_words_match_reference(bpe_vocab, ref):
    # BPE of long words (the heap-ordered merge) against the reference's loop.
    rng = random.Random(7)
    texts = ["".join(rng.choice("aeinrst") for _ in range(rng.randint(1, 400))) for _ in range(200)]
    texts += ["".join(rng.choice("ab ") for _ in range(300)) for _ in range(50)]
    assert clipdb_lines(model_dir(bpe_vocab), texts) == ref_lines(ref, texts)


def test_hf_files_give_the_same_ids(bpe_vocab, shared, tmp_path):
    # vocab.json + merges.txt laid out as Hugging Face ships them for CLIP
    import gen_model
    gen_model.write_tokenizer(tmp_path, "hf")
    assert not (tmp_path / "bpe_simple_vocab_16e6.txt.gz").exists()
    texts = TRICKY + all_captions(shared)[:3000]
    assert clipdb_lines(tmp_path, texts) == clipdb_lines(model_dir(bpe_vocab), texts)


def test_over_long_text_needs_truncate(bpe_vocab):
    text = "a cat " * 2000
    p = run("tokenize", "--model", model_dir(bpe_vocab), text)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip() == ("clipdb tokenize: text 1: text is 4002 tokens long; "
                                "the context holds 77 (use --truncate to cut it)")
    p = run("tokenize", "--model", model_dir(bpe_vocab), "--truncate", text, check=True)
    ids = json.loads(p.stdout)
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407 and ids[1:3] == [320, 2368]


def test_errors(bpe_vocab, tmp_path):
    m = model_dir(bpe_vocab)
    p = run("tokenize", "--model", m, "ok", "  ")
    assert p.returncode == 1 and p.stdout == "[49406,2481,49407]\n"
    assert p.stderr.strip() == "clipdb tokenize: text 2: empty text"
    import subprocess
    from conftest import BIN
    q = subprocess.run([BIN, "tokenize", "--model", str(m), "-"], input=b"a cat\nab\xffc\n",
                       capture_output=True)
    assert q.returncode == 1
    assert q.stderr.decode().strip() == \
        "clipdb tokenize: stdin line 2: text is not valid UTF-8 (byte 0xff at offset 2)"
    p = run("tokenize", "--model", tmp_path, "a cat")
    assert p.returncode == 1 and "bpe_simple_vocab_16e6.txt.gz" in p.stderr
    (tmp_path / "bpe_simple_vocab_16e6.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    p = run("tokenize", "--model", tmp_path, "a cat")
    assert p.returncode == 1 and p.stderr.startswith("clipdb tokenize: model ")
    assert len(p.stderr.strip().splitlines()) == 1


def test_usage_and_help(bpe_vocab):
    assert run("tokenize", "a cat").returncode == 2
    assert run("tokenize", "--model", model_dir(bpe_vocab)).returncode == 2
    assert run("tokenize", "--bogus", "--model", model_dir(bpe_vocab), "x").returncode == 2
    h = run("tokenize", "--help", check=True).stdout
    for word in ("usage: clipdb tokenize", "--model", "--truncate", "'-'", "example"):
        assert word in h
    # a text starting with '-' after '--'
    p = run("tokenize", "--model", model_dir(bpe_vocab), "--", "-5 degrees", check=True)
    assert json.loads(p.stdout)[0] == 49406
