"""Byte-level BPE tokenizer of OpenAI CLIP (49408 tokens, lower-cased text).

Text is cleaned (ftfy, HTML unescape, whitespace collapse, lower case), split
into words/numbers/punctuation by a regex, each piece is mapped byte-by-byte to
printable unicode characters and then merged by the BPE rules in
`bpe_simple_vocab_16e6.txt.gz` (shipped next to this file).
"""
import gzip
import html
import os
from functools import lru_cache

import ftfy
import regex as re

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
_VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
_NUM_MERGES = 49152 - 256 - 2  # CLIP keeps only the first merges: 256 + 256 + merges + 2 specials = 49408


@lru_cache()
def bytes_to_unicode():
    """Map every byte 0..255 to a printable unicode character.

    BPE works on strings, and we want every byte sequence (any UTF-8 text) to be
    representable without whitespace/control characters. Printable latin-1 bytes
    map to themselves; the rest are shifted to code points 256, 257, ... in byte order.
    The insertion order of the dict defines the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def clean_text(text):
    """Repair mojibake, unescape (possibly double-escaped) HTML, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class SimpleTokenizer:
    def __init__(self, bpe_path=_VOCAB_PATH):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]  # line 0 is a version header
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        chars = list(self.byte_encoder.values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.sot_token, self.eot_token = self.encoder[SOT], self.encoder[EOT]
        self.cache = {SOT: SOT, EOT: EOT}
        # Special tokens, English contractions, letter runs, single digits, punctuation runs.
        self.pat = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                              re.IGNORECASE)

    def bpe(self, token):
        """Merge the characters of one pre-token; returns space-separated BPE units."""
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]  # '</w>' marks the end of a word
        while len(word) > 1:
            # The adjacent pair with the lowest merge rank is merged everywhere, left to right.
            pair = min(zip(word, word[1:]), key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if pair not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text):
        """Text -> list of token ids (without SOT/EOT)."""
        ids = []
        for piece in self.pat.findall(clean_text(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[unit] for unit in self.bpe(piece).split(" "))
        return ids

    def decode(self, ids):
        """Token ids -> text (lower-cased, one space after each word)."""
        text = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")
