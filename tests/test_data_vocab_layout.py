"""Unified vocabulary and Emu3 layouts: hand-written id lists, label masks, caption dropout.

The layouts are checked token for token against id lists written out by hand from Emu3's format
(`BOS caption <image start> "h*w" <image token> rows+EOL EOF <image end> EOS`), using a tiny HF
tokenizer that carries Emu3's own special-token names, so the HF path is exercised as well.
"""

from __future__ import annotations

import numpy as np
import pytest

from data import layout as L
from data.vocab import SentencePieceTrainConfig, UnifiedVocab, train_sentencepiece
from model.config import PRESETS, VocabLayout

SMALL = VocabLayout(**PRESETS["debug"]["vocab"])  # text 0..255, pad 256 bos 257 eos 258 boi 259 eoi 260 img 261 eol 262 eof 263, v0 = 264

WORDS = ["[UNK]", "You", "are", "a", "helpful", "assistant", ".", "USER", ":", "ASSISTANT",
         "red", "cat", "what", "is", "this", "?", "0", "1", "2", "3", "*"]
# Emu3's order: <|endoftext|>, ..., extra_200 (EOL), extra_201 (EOF), extra_202 (unused), extra_203 (BOS),
# extra_204 (EOS), image start/end, image token, then the visual tokens.
SPECIALS = ["<|endoftext|>", "<|extra_200|>", "<|extra_201|>", "<|extra_202|>", "<|extra_203|>", "<|extra_204|>",
            "<|image start|>", "<|image end|>", "<|image token|>"] + [f"<|visual token {k:06d}|>" for k in range(8)]


@pytest.fixture(scope="module")
def hf_vocab(tmp_path_factory) -> UnifiedVocab:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + SPECIALS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.add_special_tokens(SPECIALS)
    d = tmp_path_factory.mktemp("hf_tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                            bos_token="<|extra_203|>", eos_token="<|extra_204|>").save_pretrained(str(d))
    return UnifiedVocab.from_hf(d)


def test_hf_vocab_reads_emu3_ids_by_name(hf_vocab):
    lay = hf_vocab.layout
    # Ids are the positions in WORDS + SPECIALS (21 words).
    assert lay.to_dict() == dict(text_size=21, pad_id=21, eol_id=22, eof_id=23, bos_id=25, eos_id=26, boi_id=27,
                                 eoi_id=28, img_id=29, visual_start=30, visual_size=8, vocab_size=38)
    with pytest.raises(ValueError, match="non-text ids"):
        hf_vocab.encode_text("a <|image start|> cat")  # structure cannot be injected through text


def test_t2i_layout_matches_emu3_token_for_token(hf_vocab):
    codes = np.array([[0, 1, 2], [5, 6, 7]])  # h=2, w=3
    ids = hf_vocab.t2i("a red cat", codes)
    expected = [25,            # BOS <|extra_203|>
                3, 10, 11,     # "a red cat"
                27,            # <|image start|>
                18, 20, 19,    # "2*3"
                29,            # <|image token|>
                30, 31, 32, 22,  # row 1 + EOL
                35, 36, 37, 22,  # row 2 + EOL
                23, 28,        # EOF <|image end|>
                26]            # EOS
    assert ids.dtype == np.int32 and ids.tolist() == expected
    # Caption dropped (classifier-free guidance): BOS straight into the image block.
    assert hf_vocab.t2i("", codes).tolist() == [25] + expected[4:]
    np.testing.assert_array_equal(hf_vocab.ids_to_codes(ids), codes)


def test_mmu_layout_matches_emu3_token_for_token(hf_vocab):
    codes = np.array([[4], [3]])  # h=2, w=1
    ids, answer_start = hf_vocab.mmu("what is this?", "a cat", codes)
    expected = [25,                            # BOS
                1, 2, 3, 4, 5, 6, 7, 8,        # "You are a helpful assistant. USER:"
                27, 18, 20, 17, 29,            # <image start> "2*1" <image token>
                34, 22, 33, 22, 23, 28,        # rows + EOL, EOF, <image end>
                12, 13, 14, 15, 9, 8,          # "what is this? ASSISTANT:"
                3, 11,                         # answer "a cat"
                26]                            # EOS
    assert ids.tolist() == expected
    assert answer_start == 26 and ids[answer_start] == 3
    assert hf_vocab.describe(ids) == "<bos>You are a helpful assistant . USER :<image 2*1>what is this ? ASSISTANT : a cat<eos>"


def test_lm_layout_and_text_round_trip(hf_vocab):
    assert hf_vocab.lm("what is 3*2 ?").tolist() == [25, 12, 13, 19, 20, 18, 15, 26]
    assert hf_vocab.decode_text([12, 13, 14, 15]) == "what is this ?"


def test_sentencepiece_vocab_layout_and_digits(tmp_path):
    lines = ["a handwritten digit seven", "the number 3 written by hand", "what is 12 plus 30?"] * 20
    model = train_sentencepiece(lines, tmp_path / "sp.model", SentencePieceTrainConfig(vocab_size=300))
    v = UnifiedVocab.from_sentencepiece(model, visual_size=64)
    n = v.layout.text_size
    assert n == v.text.size
    assert [v.layout.pad_id, v.layout.bos_id, v.layout.eos_id, v.layout.boi_id, v.layout.eoi_id, v.layout.img_id,
            v.layout.eol_id, v.layout.eof_id] == list(range(n, n + 8))
    assert v.layout.visual_start == n + 8 and v.layout.vocab_size == n + 8 + 64
    # Digits and "*" encode without <unk> (id 0) even where unseen in the corpus, and decode back.
    for text in ("16*16", "0123456789", "90*720"):
        ids = v.encode_text(text)
        assert 0 not in ids and v.decode_text(ids) == text
    codes = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(v.ids_to_codes(v.t2i("a digit", codes)), codes)
    # Training is deterministic: same corpus, same bytes.
    again = train_sentencepiece(lines, tmp_path / "sp2.model", SentencePieceTrainConfig(vocab_size=300))
    assert again.read_bytes() == model.read_bytes()


def _t2i_example():
    codes = np.array([[0, 1], [2, 3]])
    return L.t2i_ids([5, 6], codes, SMALL, size_ids=[7, 8, 9])


def test_t2i_labels_visual_codes_and_eos_only():
    ids = _t2i_example()
    assert ids.tolist() == [257, 5, 6, 259, 7, 8, 9, 261, 264, 265, 262, 266, 267, 262, 263, 260, 258]
    x = -100
    assert L.make_labels(ids, "t2i", {}, SMALL).tolist() == [
        x, x, x, x, x, x, x, x, 264, 265, x, 266, 267, x, x, x, 258]
    # With the image's structural tokens: EOLs, EOF and <image end> too (never <image start>, the size
    # text or <image token>: the prompt decides those).
    assert L.make_labels(ids, "t2i", {}, SMALL, image_structural_in_loss=True).tolist() == [
        x, x, x, x, x, x, x, x, 264, 265, 262, 266, 267, 262, 263, 260, 258]


def test_mmu_and_lm_labels_and_padding():
    ids, a = L.mmu_ids([1, 2], np.array([[0, 1]]), [3], [4, 5], SMALL, size_ids=[7])
    assert a == 12 and ids[a] == 4  # BOS + 2 prefix + 8 image block + 1 question
    labels = L.make_labels(ids, "mmu", {"answer_start": a}, SMALL)
    assert labels.dtype == np.int64 and len(labels) == len(ids)
    assert (labels[:a] == -100).all() and labels[a:].tolist() == [4, 5, 258]
    padded = np.concatenate([L.lm_ids([3, 4], SMALL), [SMALL.pad_id] * 3])
    assert L.make_labels(padded, "lm", None, SMALL).tolist() == [-100, 3, 4, 258, -100, -100, -100]
    padded_t2i = np.concatenate([_t2i_example(), [SMALL.pad_id] * 2])
    assert (L.make_labels(padded_t2i, "t2i", {}, SMALL, True)[-2:] == -100).all()


def test_make_labels_errors_name_sample_and_field():
    ids, _ = L.mmu_ids([1], np.array([[0]]), [3], [4], SMALL, size_ids=[7])
    with pytest.raises(ValueError, match=r"sample 'mmu-train-000007'.*answer_start"):
        L.make_labels(ids, "mmu", {"answer_start": None}, SMALL, key="mmu-train-000007")
    with pytest.raises(ValueError, match="answer_start = 99"):
        L.make_labels(ids, "mmu", {"answer_start": 99}, SMALL)
    with pytest.raises(ValueError, match="no image block"):
        L.make_labels(L.lm_ids([3], SMALL), "t2i", {}, SMALL)
    with pytest.raises(ValueError, match="task 'vqa'"):
        L.make_labels(ids, "vqa", {}, SMALL)
    with pytest.raises(ValueError, match="visual_size"):
        L.image_block(np.array([[SMALL.visual_size]]), SMALL, [7])


def test_parse_image_block_rejects_ragged_rows():
    ids = np.delete(_t2i_example(), 11)  # second row loses a code: rows of 2 and 1
    with pytest.raises(ValueError, match="ragged|EOL"):
        L.parse_image_block(ids, SMALL)


def test_strip_caption_is_the_empty_caption_layout():
    codes = np.arange(6).reshape(2, 3)
    size = [ord(c) for c in "2*3"]
    for caption in ([5, 6, 7], [], [SMALL.text_size - 1]):
        ids = L.t2i_ids(caption, codes, SMALL, size)
        out = L.strip_caption(ids, SMALL)
        np.testing.assert_array_equal(out, L.t2i_ids([], codes, SMALL, size))
        assert out.dtype == ids.dtype
    with pytest.raises(ValueError, match="needs a t2i sample"):
        L.strip_caption(L.lm_ids([1, 2], SMALL), SMALL)
