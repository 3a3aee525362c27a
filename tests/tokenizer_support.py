"""Vocabularies of other kinds than the byte-level BPE this project trains, built by hand (no download)."""
from __future__ import annotations

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from longcat_flash.tokenizer import Tokenizer


def sentencepiece_tokenizer(bos: bool = False) -> Tokenizer:
    """A Llama-2-style vocabulary: SentencePiece BPE with byte fallback and a "▁" prefix space, whose decoder strips
    a text's leading space (so a token reads otherwise at a text's start than inside it); `bos`: with Llama 2's
    post-processor, which puts `<s>` before an encoded text."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("▁", "hello"), ("▁", "t")]
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz", *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token=None)


def wordpiece_tokenizer() -> Tokenizer:
    """A BERT-style WordPiece vocabulary, whose decoder the constraint library does not read."""
    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, **{c: 4 + i for i, c in enumerate("abcdefghij")}}
    backend = tokenizers.Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("[PAD]", "[CLS]", "[SEP]")])
    return Tokenizer(backend, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]")


def unigram_tokenizer() -> Tokenizer:
    """A T5-style Unigram vocabulary: its special pieces are pieces of the model too, "</s>" with the best score."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("▁a", -1.0),
              *((c, -5.0) for c in "ab</s>")]
    backend = tokenizers.Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.add_special_tokens([AddedToken("<pad>", special=True), AddedToken("</s>", special=True)])
    return Tokenizer(backend, bos_token=None, eos_token="</s>", pad_token="<pad>")
