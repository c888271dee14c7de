import json
import random
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unet_seg.models.tokenizer import BOS, EOS, PACKAGED_BPE, CLIPTokenizer, byte_symbols, clip_word_pattern, normalize

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# Pieces that stress each stage: contractions, whitespace (incl. \x1c, which Python's \s matches and
# Oniguruma's does not), numbers of several scripts, emoji sequences, combining marks and NFC
# compositions, case mappings that change length (İ) or depend on context (final sigma), non-Latin words.
FRAGMENTS = [
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'", "''", " ", "  ", "\t", "\n", "\r\n", "\x0b",
    "\x1c", "\x1f", "\x85", "\xa0", "\u2003", "\u3000", "!", "!!", "...", ",", "-", "_", "0", "12", "3.5",
    "½", "Ⅻ", "٣", "😀", "👍🏽", "🇩🇪", "👨\u200d👩\u200d👧", "e\u0301", "\u0301", "\u0338", "ß", "İ",
    "ΑΣ", "Σ", "ﬁ", "ǅ", "\u1100\u1161", "Å", "日本語", "Привет", "مرحبا", "नमस्ते", "A", "photo", "Cat",
    "aaaa", "looool", "zzzzz", "....",  # overlapping pairs: BPE merges the leftmost first
]
SPECIALS = [BOS, EOS, "<|EndOfText|>", "<|STARTOFTEXT|>", "<", "|>"]
# Characters this Python's unicodedata knows: transformers' tables (Oniguruma, Rust) have newer Unicode.
ASSIGNED = st.characters(exclude_categories=("Cs", "Cn"))


def prompts(specials: bool = False) -> st.SearchStrategy[str]:
    pieces = st.sampled_from(FRAGMENTS + SPECIALS * specials) | st.text(ASSIGNED, max_size=8)
    return st.lists(pieces, max_size=40).map("".join)


def learn_merges(corpus: str, n: int) -> list[tuple[str, str]]:
    """Plain BPE training on the corpus's whitespace-separated, byte-mapped words: `n` most frequent pairs."""
    symbols = byte_symbols()
    words = Counter(corpus.lower().split())
    parts = {w: [symbols[b] for b in w.encode()] for w in words}
    for p in parts.values():
        p[-1] += "</w>"
    merges = []
    for _ in range(n):
        pairs = Counter()
        for w, p in parts.items():
            for pair in zip(p, p[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = max(pairs, key=pairs.get)
        merges.append(best)
        for p in parts.values():
            i = 0
            while i < len(p) - 1:
                if (p[i], p[i + 1]) == best:
                    p[i : i + 2] = [p[i] + p[i + 1]]
                i += 1
    return merges


CORPUS = (
    "a photo of a cat sitting on the table next to the window , it's a sunny day and the cat's fur "
    "looks soft . don't we all love photos of cats and dogs ? the dog isn't there , we'll see it "
    "later ! a painting of a red car in the rain , 1920s style , 4k , highly detailed , trending "
    "on artstation . ein foto einer katze auf dem tisch . фото кошки на столе . 桌子上的猫的照片 . "
    "テーブルの上の猫の写真 😀 😀 👍 café naïve résumé ελληνικά σοφία 12 34 56 78 90 "
    "aa aa aaa looool lool zzz zz .... ..."
)


def write_tokenizer_folder(folder: Path, vocab: dict, merges: list, style: str, max_length: int = 77) -> Path:
    """vocab.json, merges.txt and the two config files as SD1 / SD2 checkpoints on the hub have them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    added = lambda content: {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    config = {
        "add_prefix_space": False, "bos_token": {"__type": "AddedToken", **added(BOS)}, "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **added(EOS)}, "errors": "replace", "model_max_length": max_length,
        "pad_token": EOS, "tokenizer_class": "CLIPTokenizer", "unk_token": {"__type": "AddedToken", **added(EOS)},
    }
    special = {"bos_token": added(BOS), "eos_token": added(EOS), "pad_token": {"sd1": EOS, "sd2": "!"}[style], "unk_token": added(EOS)}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return folder


def small_vocab(seed: int = 0) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte symbols, byte symbols + </w>, 300 learned merges and the two specials, with shuffled ids."""
    merges = learn_merges(CORPUS, 300)
    symbols = list(byte_symbols().values())
    tokens = list(dict.fromkeys(symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]))
    ids = list(range(len(tokens)))
    random.Random(seed).shuffle(ids)
    return dict(zip(tokens, ids)), merges


def reference_ids(ref, texts: list[str]) -> torch.Tensor:
    """What diffusers' pipelines call."""
    return ref(texts, padding="max_length", max_length=ref.model_max_length, truncation=True, return_tensors="pt").input_ids


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def small_pair(request, tmp_path_factory):
    folder = write_tokenizer_folder(tmp_path_factory.mktemp("tok") / "tokenizer", *small_vocab(), request.param)
    return request.param, CLIPTokenizer.from_folder(folder), transformers.CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def packaged():
    return CLIPTokenizer.from_bpe()


# --- stages, against the tokenizers pipeline transformers builds --------------------------------------


def test_word_pattern_classes_equal_oniguruma_for_every_assigned_codepoint():
    # Each character c sits in "a" c "." "1": the pieces tell letter / number / punctuation / whitespace apart.
    chars = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) not in ("Cs", "Cn")]
    text = " ".join(f"a{c}.1" for c in chars)
    split = tokenizers.pre_tokenizers.Split(
        tokenizers.Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), "removed", invert=True
    )
    assert clip_word_pattern().findall(text) == [piece for piece, _ in split.pre_tokenize_str(text)]


@pytest.fixture(scope="module")
def pipeline():
    """The tokenizers pipeline (normalizer, pre-tokenizer) that transformers' CLIPTokenizer builds."""
    return transformers.CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[]).backend_tokenizer


@given(prompts(specials=True))
def test_normalize_equals_transformers_normalizer(pipeline, text):
    assert normalize(text) == pipeline.normalizer.normalize_str(text)


@given(prompts())
def test_words_equal_transformers_pretokenizer(pipeline, text):
    symbols = byte_symbols()
    ours = ["".join(symbols[b] for b in w.encode()) for w in clip_word_pattern().findall(normalize(text))]
    assert ours == [piece for piece, _ in pipeline.pre_tokenizer.pre_tokenize_str(normalize(text))]


# --- ids, small generated vocabulary (always) ----------------------------------------------------------


@given(st.lists(prompts(specials=True), min_size=1, max_size=4))
def test_small_vocab_ids_equal_transformers(small_pair, texts):
    style, ours, ref = small_pair
    if style == "sd1":  # transformers reads SD1's EOS case-sensitively on the raw text (see test below)
        texts = [t for t in texts if "<|" not in t] or ["a cat"]
    assert torch.equal(ours(texts), reference_ids(ref, texts))


@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(ASSIGNED, max_size=8), min_size=60, max_size=200).map("".join))
def test_long_prompts_truncate_to_max_length_ending_in_eos_like_transformers(small_pair, text):
    _, ours, ref = small_pair
    ids = ours([text, "short"])
    assert ids.shape == (2, 77) and ids[0, 0] == ours.bos_token_id
    assert ids[0, -1] == ours.eos_token_id or (ids[0] == ours.pad_token_id).any()
    assert torch.equal(ids, reference_ids(ref, [text, "short"]))


def test_sd1_style_reads_special_token_strings_after_lower_casing_unlike_transformers(small_pair):
    style, ours, ref = small_pair
    ids = ours.encode("a <|EndOfText|> b")
    assert ids[2] == ours.eos_token_id and ours.encode("a <|endoftext|> b") == ids
    # transformers agrees for SD2-style configs and splits the string into byte tokens for SD1-style ones.
    assert (reference_ids(ref, ["a <|EndOfText|> b"])[0, 2] == ours.eos_token_id) == (style == "sd2")


@given(st.lists(prompts(specials=True), min_size=1, max_size=3))
def test_rows_are_bos_tokens_eos_then_padding(small_pair, texts):
    _, ours, _ = small_pair
    ids = ours(texts)
    assert ids.dtype == torch.long and ids.shape == (len(texts), 77)
    for row, text in zip(ids.tolist(), texts):
        encoded = ours.encode(text)
        assert row[: len(encoded)] == encoded == [ours.bos_token_id, *ours.tokens(text)[:75], ours.eos_token_id]
        assert set(row[len(encoded) :]) <= {ours.pad_token_id}


# --- the real CLIP vocabulary ----------------------------------------------------------------------------


def test_from_bpe_builds_sd_vocab_json(packaged):
    """On the packaged merges file: runs on a fresh clone (no ../shared)."""
    assert len(packaged.vocab) == 49408 and packaged.bos_token_id == 49406 and packaged.eos_token_id == 49407
    # ids SD users know from "a photo of a cat!"
    assert [packaged.vocab[t] for t in ["!", "!</w>", "a</w>", "photo</w>", "of</w>", "cat</w>"]] == [0, 256, 320, 1125, 539, 2368]


def test_packaged_bpe_equals_the_shared_copy(shared_dir, packaged):
    ours = CLIPTokenizer.from_bpe(shared_dir / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz")
    assert ours.vocab == packaged.vocab and ours.merge_ranks == packaged.merge_ranks


@pytest.mark.parametrize("style, pad_id", [("sd1", 49407), ("sd2", 0)])
def test_real_vocab_ids_equal_transformers(tmp_path, packaged, style, pad_id):
    """The packaged vocabulary (unet_seg/data): runs on a fresh clone, no ../shared needed."""
    folder = write_tokenizer_folder(tmp_path / "tokenizer", packaged.vocab, list(packaged.merge_ranks), style)
    ours, ref = CLIPTokenizer.from_folder(folder), transformers.CLIPTokenizer.from_pretrained(folder)
    assert ref.get_vocab() == ours.vocab and ours.pad_token_id == ref.pad_token_id == pad_id
    fixed = ["a photo of a cat!", "A <|startoftext|> b <|endoftext|> c", "Don't STOP 'til you're done", "sooo cool aaaa", "x " * 100]
    assert torch.equal(ours(fixed), reference_ids(ref, fixed))

    @given(st.lists(prompts(specials=style == "sd2"), min_size=1, max_size=4))
    def check(texts):
        assert torch.equal(ours(texts), reference_ids(ref, texts))

    check()


# --- loading and errors ------------------------------------------------------------------------------------


def test_packaged_bpe_file_is_clips(packaged):
    assert PACKAGED_BPE.is_file() and len(packaged.vocab) == 49408
    assert packaged.bos_token_id == 49406 and packaged.eos_token_id == 49407
    # ids SD users know from "a photo of a cat!"
    assert [packaged.vocab[t] for t in ["!", "!</w>", "a</w>", "photo</w>", "of</w>", "cat</w>"]] == [0, 256, 320, 1125, 539, 2368]
    assert packaged.pad_token_id == 49407 and CLIPTokenizer.from_bpe(pad_token="!").pad_token_id == 0


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_from_folder_reads_pad_token_and_max_length(tmp_path, style):
    vocab, merges = small_vocab()
    ours = CLIPTokenizer.from_folder(write_tokenizer_folder(tmp_path, vocab, merges, style, max_length=16))
    assert ours.pad_token_id == vocab[{"sd1": EOS, "sd2": "!"}[style]] and ours(["a", "b", "c"]).shape == (3, 16)


def test_from_folder_caps_transformers_no_limit_length_at_the_text_encoders_positions(tmp_path):
    """transformers saves `model_max_length` 1e30 ("no limit") for a tokenizer made without one."""
    vocab, merges = small_vocab()
    write_tokenizer_folder(tmp_path, vocab, merges, "sd1", max_length=int(1e30))
    ours = CLIPTokenizer.from_folder(tmp_path)
    assert ours.max_length == 77 and ours(["a cat", "b"]).shape == (2, 77)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": "long"}))
    (tmp_path / "special_tokens_map.json").unlink()
    with pytest.raises(ValueError, match="model_max_length 'long'"):
        CLIPTokenizer.from_folder(tmp_path)


class CountingRanks(dict):
    """A merge-rank table that counts its look-ups: the work BPE does."""

    lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)


def test_bpe_work_grows_linearly_with_word_length_and_stops_after_the_kept_tokens(packaged):
    """A long URL or hash in a caption must not stall a data loader: BPE of a word of n symbols
    costs O(n log n) rank look-ups (it was O(n^2): ~40 s for 20 000 characters)."""
    tok = CLIPTokenizer.from_bpe()
    word = "".join(random.Random(0).choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(3000))
    word = word.replace("0", "o")  # letters only: one word, not a word per digit
    tok.merge_ranks = CountingRanks(tok.merge_ranks)
    ids = tok.tokens(word)
    assert tok.merge_ranks.lookups <= 3 * len(word)
    assert ids[:50] == packaged.tokens(word[:2000])[:50]  # far from the cut, the same tokens
    tok.merge_ranks.lookups = 0
    row = tok([" ".join([word[:40]] * 1000)])  # 1000 words, of which only the first 75 tokens are kept
    assert row.shape == (1, 77) and tok.merge_ranks.lookups <= 3 * 40 * 75


@given(st.text("abcdefgh", min_size=1, max_size=300))
def test_bpe_equals_the_rescanning_definition(small_pair, word):
    """Merge the lowest-ranked adjacent pair, leftmost first, until none is left: spelled out."""
    _, ours, _ = small_pair
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        ranks = [ours.merge_ranks.get(pair, len(ours.merge_ranks)) for pair in zip(parts, parts[1:])]
        best = min(range(len(ranks)), key=ranks.__getitem__)
        if ranks[best] == len(ours.merge_ranks):
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    assert ours._merge_word(word) == tuple(ours.vocab[p] for p in parts)


def test_from_folder_without_configs_pads_with_eos(tmp_path):
    vocab, merges = small_vocab()
    write_tokenizer_folder(tmp_path, vocab, merges, "sd2")
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "special_tokens_map.json").unlink()
    ours = CLIPTokenizer.from_folder(tmp_path)
    assert ours.pad_token_id == vocab[EOS] and ours.max_length == 77


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt"])
def test_from_folder_names_missing_file(tmp_path, name):
    write_tokenizer_folder(tmp_path, *small_vocab(), "sd1")
    (tmp_path / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        CLIPTokenizer.from_folder(tmp_path)


def test_from_folder_names_malformed_merges_line(tmp_path):
    write_tokenizer_folder(tmp_path, *small_vocab(), "sd1")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nt h\nthe\n")
    with pytest.raises(ValueError, match="line 3"):
        CLIPTokenizer.from_folder(tmp_path)


def test_from_folder_rejects_pad_token_outside_vocab(tmp_path):
    write_tokenizer_folder(tmp_path, *small_vocab(), "sd1")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match="<pad>"):
        CLIPTokenizer.from_folder(tmp_path)


def test_from_bpe_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.txt.gz"):
        CLIPTokenizer.from_bpe(tmp_path / "nothere.txt.gz")


def test_constructor_rejects_incomplete_vocab_and_unknown_merges():
    vocab, merges = small_vocab()
    with pytest.raises(ValueError, match="byte tokens"):
        CLIPTokenizer({t: i for t, i in vocab.items() if t != "a</w>"}, merges, vocab[EOS])
    with pytest.raises(ValueError, match="not in the vocab"):
        CLIPTokenizer(vocab, merges + [("q", "z</w>")], vocab[EOS])
    with pytest.raises(ValueError, match="pad_token_id"):
        CLIPTokenizer(vocab, merges, len(vocab) + 5)
    with pytest.raises(ValueError, match="max_length"):
        CLIPTokenizer(vocab, merges, vocab[EOS], max_length=1)


def test_call_takes_str_or_list_of_str(packaged):
    assert torch.equal(packaged("a cat"), packaged(["a cat"])) and packaged([]).shape == (0, 77)
    with pytest.raises(TypeError, match="list of str"):
        packaged(["a cat", 3])


def test_a_cut_vocabulary_keeps_the_first_merges_and_tokenizes_everything_inside_it():
    full, cut = CLIPTokenizer.from_bpe(pad_token="!"), CLIPTokenizer.from_bpe(pad_token="!", num_merges=1534)
    assert len(cut.vocab) == 2048 and cut.bos_token_id == 2046 and cut.eos_token_id == 2047
    text = "a red striped disc at top left, on grey background; Übermäßig 123"
    ids = cut(text)
    assert int(ids.max()) < 2048 and ids[0, 0] == 2046
    assert cut.tokens("red at top left") == full.tokens("red at top left")  # tokens below the cut keep CLIP's ids
    assert len(cut.tokens("disc")) == 2 and len(full.tokens("disc")) == 1  # merged later than the cut: in pieces
    with pytest.raises(ValueError, match="num_merges"):
        CLIPTokenizer.from_bpe(num_merges=10**6)
