#!/usr/bin/python3
"""An independent Python implementation of CLIP's tokenizer, written from the
reference algorithm (OpenAI clip/simple_tokenizer.py), used only by tests to
check `clipdb tokenize`.

Like the C tokenizer it skips ftfy.fix_text (not installed here); everything
else follows the reference: html.unescape twice, strip, \\s+ -> ' ', strip,
str.lower(), the IGNORECASE split pattern (python3-regex), byte-level BPE of
each piece by lowest merge rank, start/end tokens, truncation to the context
keeping the end token.

usage: ref_tokenizer.py --bpe bpe_simple_vocab_16e6.txt.gz [--context 77] [--truncate] < texts
       (one text per line; prints one JSON array of ids per line, or
        {"error": ...} for an empty text or one over the context)
"""
import argparse
import gzip
import html
import json
import sys

import regex as re


def bytes_to_unicode():
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def get_pairs(word):
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


def basic_clean(text):
    # ftfy.fix_text(text) is skipped, as in the C implementation.
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text):
    text = re.sub(r"\s+", " ", text)
    return text.strip()


class Tokenizer:
    def __init__(self, bpe_path):
        self.byte_encoder = bytes_to_unicode()
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = merges[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                              re.IGNORECASE)
        self.sot = self.encoder["<|startoftext|>"]
        self.eot = self.encoder["<|endoftext|>"]

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text):
        ids = []
        text = whitespace_clean(basic_clean(text)).lower()
        for token in re.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def tokenize(self, text, context=77, truncate=False):
        """clip.tokenize's policy plus clipdb's "empty text" rule."""
        ids = [self.sot] + self.encode(text) + [self.eot]
        if len(ids) == 2:
            raise ValueError("empty text")
        if len(ids) > context:
            if not truncate:
                raise ValueError(f"text is {len(ids)} tokens long; the context holds {context}")
            ids = ids[:context]
            ids[-1] = self.eot
        return ids


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpe", required=True)
    ap.add_argument("--context", type=int, default=77)
    ap.add_argument("--truncate", action="store_true")
    a = ap.parse_args()
    tok = Tokenizer(a.bpe)
    out = []
    for line in sys.stdin.buffer.read().decode("utf-8").split("\n")[:-1]:
        try:
            out.append(json.dumps(tok.tokenize(line, a.context, a.truncate), separators=(",", ":")))
        except ValueError as e:
            out.append(json.dumps({"error": str(e)}))
    sys.stdout.write("".join(o + "\n" for o in out))


if __name__ == "__main__":
    main()
