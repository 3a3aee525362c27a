"""The tokenizer, one job per module:

    tokenizer.py   `Tokenizer`: encode/decode, conversations to ids, save/load as an HF tokenizer checkpoint
    chat.py        LongCat's default chat template (docs/chat_format.md) and the checks a conversation passes first
    bpe.py         training a byte-level BPE (`train_tokenizer`), and the stdlib-trained one (`stdlib_tokenizer`)

Their public names are importable from `longcat_flash.tokenizer` directly.
"""
from .bpe import STDLIB_MIN_VOCAB, STDLIB_SAMPLE_FILES, TRAINED_VOCAB_MIN, stdlib_tokenizer, train_tokenizer
from .chat import CHAT_ROLES, DEFAULT_CHAT_TEMPLATE
from .tokenizer import (CHAT_MARKERS, DEFAULT_MODEL_MAX_LENGTH, SPECIAL_TOKENS, TOKENIZER_FILE, TOOL_CALL_CLOSE,
                        TOOL_CALL_OPEN, TOOL_CALL_TOKENS, RenderedChat, Tokenizer, utf8_text)

__all__ = ["CHAT_MARKERS", "CHAT_ROLES", "DEFAULT_CHAT_TEMPLATE", "DEFAULT_MODEL_MAX_LENGTH", "SPECIAL_TOKENS",
           "STDLIB_MIN_VOCAB", "STDLIB_SAMPLE_FILES", "TOKENIZER_FILE", "TOOL_CALL_CLOSE", "TOOL_CALL_OPEN",
           "TOOL_CALL_TOKENS", "TRAINED_VOCAB_MIN", "RenderedChat", "Tokenizer", "stdlib_tokenizer",
           "train_tokenizer", "utf8_text"]
