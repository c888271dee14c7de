r"""CLIP's byte-level BPE tokenizer: prompts -> token ids [B, 77] for the CLIP text encoder.

Gives the ids of transformers' `CLIPTokenizer` (5.x, tokenizers-backed) on the same vocab.json and
merges.txt, which is what diffusers feeds SD's text encoder:

    NFC -> whitespace runs to one space -> per-character lower-casing
    -> special-token strings (BOS, EOS, pad) become their ids; the rest splits into words with
       CLIP's pattern  's|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+
    -> each word's UTF-8 bytes as printable characters -> BPE, `</w>` on the word's last symbol
    -> [BOS, tokens[:max_length - 2], EOS] padded with the pad id to max_length.

No ftfy clean-up (transformers 5 applies none either). SD1 checkpoints pad with EOS (49407), SD2
with "!" (id 0); as in transformers, a pad string in the text is read as the pad token, so SD2
tokenizes "cat!" as [cat</w>, 0] where OpenCLIP has [cat</w>, !</w>]. Special-token strings are
read after lower-casing, as CLIP does; transformers reads SD1's "<|endoftext|>" case-sensitively.
Letters and numbers are Unicode categories L* and N* of this Python's `unicodedata`.
"""

import functools
import gzip
import heapq
import json
import re
import sys
import unicodedata
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from ..files import atomic_path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
PACKAGED_BPE = Path(__file__).resolve().parents[1] / "data" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2  # merges CLIP takes from its file: 512 byte symbols + merges + 2 specials = 49408
MAX_POSITIONS = 77  # the CLIP text encoders of SD 1.x / 2.x: no tokenizer length beyond this can be used

# Unicode White_Space, which is Oniguruma's \s; Python's \s also matches \x1c-\x1f.
WHITESPACE = r"\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
WHITESPACE_RUN = re.compile(f"[{WHITESPACE}]+")


def byte_symbols() -> dict[int, str]:
    """Byte -> the printable character standing for it in BPE symbols, in CLIP's vocabulary order:
    the printable Latin-1 bytes as themselves, then the other 68 bytes as U+0100... in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(0x100 + i) for i, b in enumerate(others)}}


def _category_class(major: str) -> str:
    r"""`re` character-class body of every character whose Unicode category starts with `major`
    ("L" letters, "N" numbers): stdlib `re` has no \p{L} / \p{N}."""
    codes = [c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c))[0] == major]
    starts = [c for i, c in enumerate(codes) if i == 0 or codes[i - 1] != c - 1]
    ends = [c for i, c in enumerate(codes) if i == len(codes) - 1 or codes[i + 1] != c + 1]
    return "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in zip(starts, ends))


@functools.cache
def clip_word_pattern() -> re.Pattern:
    r"""CLIP's word pattern `'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+` for stdlib `re`."""
    letters, numbers = _category_class("L"), _category_class("N")
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]|[^{WHITESPACE}{letters}{numbers}]+")


def normalize(text: str) -> str:
    """NFC, whitespace runs to one space, lower-case one character at a time (no final-sigma rule)."""
    text = WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


class CLIPTokenizer:
    """Byte-level BPE with CLIP's normalisation and word pattern; `tokenizer(prompts) -> [B, max_length]`."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token_id: int, max_length: int = 77):
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for BOS and EOS), got {max_length!r}")
        missing = [t for t in (BOS, EOS) if t not in vocab]
        symbols = list(byte_symbols().values())
        missing += [s for s in symbols + [s + END_OF_WORD for s in symbols] if s not in vocab]
        if missing:
            raise ValueError(f"vocab lacks {len(missing)} of CLIP's special and byte tokens, e.g. {missing[:5]}")
        token_of_id = {i: t for t, i in vocab.items()}
        if pad_token_id not in token_of_id:
            raise ValueError(f"pad_token_id {pad_token_id} is not an id of the vocab")
        for a, b in merges:
            if a + b not in vocab:
                raise ValueError(f"merge ({a!r}, {b!r}) makes {a + b!r}, which is not in the vocab")
        self.vocab, self.pad_token_id, self.max_length = vocab, pad_token_id, max_length
        self.bos_token_id, self.eos_token_id = vocab[BOS], vocab[EOS]
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.special_ids = {t: vocab[t] for t in (BOS, EOS, token_of_id[pad_token_id])}
        self._special = re.compile("(" + "|".join(map(re.escape, sorted(self.special_ids, key=len, reverse=True))) + ")")
        self._words = clip_word_pattern()
        self._byte_symbols = byte_symbols()
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._merge_word)

    @classmethod
    def from_folder(cls, path: Union[str, Path], max_positions: int = MAX_POSITIONS) -> "CLIPTokenizer":
        """A checkpoint's `tokenizer/` folder: vocab.json, merges.txt; pad token and `model_max_length`
        from tokenizer_config.json, overridden by special_tokens_map.json (as transformers reads them).
        The length is capped at the text encoder's `max_positions`: transformers writes its "no
        limit" (1e30) where a tokenizer was saved without a length."""
        folder = Path(path)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: no {name} (a CLIP tokenizer folder holds vocab.json and merges.txt)")
        vocab = _read_json(folder / "vocab.json")
        if not all(isinstance(t, str) and isinstance(i, int) for t, i in vocab.items()):
            raise ValueError(f"{folder / 'vocab.json'}: expected an object of token -> int id")
        config = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                config.update(_read_json(folder / name))
        pad = config.get("pad_token", EOS)
        pad = pad["content"] if isinstance(pad, dict) else pad
        if pad not in vocab:
            raise ValueError(f"{folder}: pad token {pad!r} is not in vocab.json")
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        header = lines[0].startswith("#version")
        merges = _read_merges(folder / "merges.txt", lines[header:], first_line=1 + header)
        length = config.get("model_max_length", max_positions)
        if not isinstance(length, (int, float)) or isinstance(length, bool) or length < 2:
            raise ValueError(f"{folder}: model_max_length {length!r} is not a length >= 2")
        return cls(vocab, merges, vocab[pad], int(min(length, max_positions)))

    def save_pretrained(self, folder: Union[str, Path]) -> Path:
        """Write a `tokenizer/` folder (vocab.json, merges.txt, tokenizer_config.json,
        special_tokens_map.json) that `from_folder` and transformers' CLIPTokenizer read back."""
        folder = Path(folder)
        merges = sorted(self.merge_ranks, key=self.merge_ranks.get)
        pad = next(t for t, i in self.vocab.items() if i == self.pad_token_id)
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad}
        files = {
            "vocab.json": json.dumps(self.vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
            "tokenizer_config.json": json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, **special}, indent=2),
            "special_tokens_map.json": json.dumps(special, indent=2),
        }
        for name, text in files.items():
            with atomic_path(folder / name) as tmp:
                tmp.write_text(text, encoding="utf-8")
        return folder

    @classmethod
    def from_bpe(
        cls, path: Union[str, Path, None] = None, pad_token: str = EOS, max_length: int = 77, num_merges: int = CLIP_MERGES
    ) -> "CLIPTokenizer":
        """CLIP's own gzipped merges file (default: the packaged copy) -> its 49408-token vocabulary:
        byte symbols, byte symbols + `</w>`, one token per merge, BOS, EOS (= SD's vocab.json).
        `num_merges` < CLIP's 48894 keeps the first merges only: a smaller BPE vocabulary of
        514 + num_merges tokens (BOS, EOS last) in which every text still has a tokenization."""
        if not isinstance(num_merges, int) or not 0 <= num_merges <= CLIP_MERGES:
            raise ValueError(f"num_merges must be an int in [0, {CLIP_MERGES}], got {num_merges!r}")
        path = Path(path) if path is not None else PACKAGED_BPE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such BPE merges file (CLIP's bpe_simple_vocab_16e6.txt.gz)")
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        merges = _read_merges(path, lines[1 : num_merges + 1], first_line=2)  # line 1 is a header
        if len(merges) != num_merges:
            raise ValueError(f"{path}: {len(merges)} merges, the vocabulary needs {num_merges}")
        symbols = list(byte_symbols().values())
        tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
        vocab = {t: i for i, t in enumerate(tokens)}
        if pad_token not in vocab:
            raise ValueError(f"pad_token {pad_token!r} is not a token of CLIP's vocabulary")
        return cls(vocab, merges, vocab[pad_token], max_length)

    def _merge_word(self, word: str) -> tuple[int, ...]:
        """BPE of one word of byte symbols: merge the lowest-ranked adjacent pair, leftmost first,
        until none is left. Candidate pairs wait in a heap keyed (rank, position), so a word of n
        symbols costs O(n log n), not the O(n²) of rescanning every pair after each merge."""
        parts = [*word[:-1], word[-1] + END_OF_WORD]  # parts[i]: the symbol starting at i, "" once merged away
        nxt, prv = list(range(1, len(parts))) + [-1], list(range(-1, len(parts) - 1))
        heap = []

        def push(i: int) -> None:
            j = nxt[i]
            if j >= 0 and (rank := self.merge_ranks.get((parts[i], parts[j]))) is not None:
                heapq.heappush(heap, (rank, i, parts[i], parts[j]))

        for i in range(len(parts) - 1):
            push(i)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i]
            if parts[i] != left or j < 0 or parts[j] != right:
                continue  # stale: a neighbour merged since this pair was queued
            parts[i], parts[j] = left + right, ""
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return tuple(self.vocab[p] for p in parts if p)

    def tokens(self, text: str, limit: Optional[int] = None) -> list[int]:
        """Token ids of `text` alone: no BOS/EOS; with `limit`, the first `limit` of them (words
        after those are not tokenized at all)."""
        ids = []
        for i, piece in enumerate(self._special.split(normalize(text))):
            if limit is not None and len(ids) >= limit:
                break
            if i % 2:  # split's captured separators: special-token strings
                ids.append(self.special_ids[piece])
                continue
            for word in self._words.finditer(piece):
                ids.extend(self._bpe("".join(self._byte_symbols[b] for b in word.group().encode("utf-8"))))
                if limit is not None and len(ids) >= limit:
                    break
        return ids[:limit]

    def encode(self, text: str) -> list[int]:
        """[BOS, tokens..., EOS] truncated to max_length, unpadded: index i is position i of `__call__`'s row."""
        return [self.bos_token_id, *self.tokens(text, limit=self.max_length - 2), self.eos_token_id]

    def __call__(self, texts: Union[str, list[str]]) -> Tensor:
        """Prompt(s) -> ids [B, max_length] (int64), padded with `pad_token_id`."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"expected a str or a list of str, got {type(texts).__name__}")
        ids = torch.full((len(texts), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, text in zip(ids, texts):
            encoded = self.encode(text)
            row[: len(encoded)] = torch.tensor(encoded)
        return ids


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_merges(path: Path, lines: list[str], first_line: int) -> list[tuple[str, str]]:
    """Lines "a b" -> [(a, b)]; a final empty line (the file's last newline) is skipped."""
    merges = []
    for number, line in enumerate(lines[:-1] if lines and lines[-1] == "" else lines, start=first_line):
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"{path}: line {number} is {line!r}, expected two symbols separated by one space")
        merges.append((pair[0], pair[1]))
    return merges
