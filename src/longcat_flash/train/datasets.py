"""A run's inputs: its tokenizer (reused, loaded or trained on the corpus) and its training and validation sets
(token windows of a cached shard, or packed conversations for SFT, with copy windows mixed in on request)."""
from __future__ import annotations

from pathlib import Path

from ..chat_template import writes_tool_calls_with
from ..data import CopyMix, Corpus, TokenDataset, build_token_shard, ordinary_ids, sample_texts, validation_batches
from ..data.conversation_packing import ConversationDataset, conversation_datasets
from ..data.corpus import RECORD_KINDS, corpus_kind
from ..data.shards import megabytes
from ..files import cache_home
from ..tokenizer import CHAT_MARKERS, TOKENIZER_FILE, TOOL_CALL_OPEN, Tokenizer, train_tokenizer
from .config import DataConfig, TrainConfig


def check_text_field(cfg: TrainConfig) -> None:
    """Refuse a data.text_field set for a corpus with no records to read it from (text files only): it was recorded
    and did nothing. The stdlib and SFT runs refuse it with the other unread fields (train/config.py)."""
    data, corpus = cfg.data, Corpus(cfg.data.source)
    if data.text_field == DataConfig.text_field or cfg.sft.data is not None or corpus.is_stdlib:
        return
    if not any(corpus_kind(path) in RECORD_KINDS for path in corpus.files()):
        raise ValueError(f"data.text_field={data.text_field} is not read by a corpus of text files ({data.source} "
                         f"holds no {'/'.join(RECORD_KINDS)} records); drop it (it would be recorded, and do nothing)")


def build_tokenizer(cfg: TrainConfig, out: Path, *, reuse: bool, progress: bool | None) -> Tokenizer:
    """The run's tokenizer: OUT's own when resuming, else `data.tokenizer`, else init_from's, else a BPE trained
    on the corpus. For SFT, the chat markers the model writes become single tokens (added when missing), where
    its chat template writes them (one that writes calls in another format would never use them)."""
    if reuse and (out / TOKENIZER_FILE).is_file():
        return Tokenizer.load(out)
    if cfg.data.tokenizer is not None or cfg.init_from is not None:
        tokenizer = Tokenizer.load(cfg.data.tokenizer or cfg.init_from)
        if cfg.sft.data is not None and writes_tool_calls_with(tokenizer, TOOL_CALL_OPEN):
            tokenizer = tokenizer.with_tokens(CHAT_MARKERS)
    else:
        if progress is not None:  # a bar or not, the phase is said
            print(f"training a byte-level BPE (vocab {cfg.model.vocab_size}) on up to "
                  f"{megabytes(cfg.data.tokenizer_sample_bytes)} of {cfg.data.source}", flush=True)
        texts = sample_texts(cfg.data.source, cfg.data.tokenizer_sample_bytes, text_field=cfg.data.text_field)
        tokenizer = train_tokenizer(texts, cfg.model.vocab_size)
        if (unused := cfg.model.vocab_size - tokenizer.vocab_size) > 0:  # BPE found no more merges to make
            print(f"note: the tokenizer trained on the corpus sample has {tokenizer.vocab_size} tokens of "
                  f"model.vocab_size={cfg.model.vocab_size} (its sample held no more merges): {unused} embedding "
                  "rows stay unused; sample more text (data.tokenizer_sample_bytes) or lower model.vocab_size",
                  flush=True)
    if tokenizer.vocab_size > cfg.model.vocab_size and cfg.sft.data is None:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than "
                         f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    tokenizer.model_max_length = cfg.model.max_position_embeddings
    tokenizer.save(out)
    return tokenizer


def build_datasets(cfg: TrainConfig, tokenizer: Tokenizer, progress: bool | None
                   ) -> tuple[TokenDataset | ConversationDataset | CopyMix, TokenDataset | ConversationDataset]:
    """Tokenize the corpus once into a cached shard; windows of seq_len + 1; the tail is the validation split.
    SFT: the conversations, rendered and packed into windows of seq_len + 1 (data/conversation_packing.py).
    `data.copy_fraction` mixes copy windows into the training split (data/copying.py)."""
    data = cfg.data
    cache = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    if cfg.sft.data is not None:
        ends = [tokenizer.decode([i], skip_special_tokens=False) for i in cfg.model.eos_token_ids]  # where it stops
        train_set, val_set = conversation_datasets(tokenizer, cfg.sft.data, cfg.sft.val_data, data.val_fraction,
                                                   data.seq_len, cfg.seed, cfg.sft.overlong, cfg.sft.ignore_columns,
                                                   ends, progress, cache)
    else:
        shard = build_token_shard(data.source, tokenizer, cache, text_field=data.text_field, max_bytes=data.max_bytes,
                                  progress=progress)
        train_set = TokenDataset.from_shard(shard, data.seq_len, "train", data.val_fraction)
        val_set = TokenDataset.from_shard(shard, data.seq_len, "val", data.val_fraction)
    validation_batches(val_set, data.batch_size)  # fails now if the split is empty
    if data.copy_fraction:
        reserved = list(tokenizer.backend.get_added_tokens_decoder())  # the ids of the special tokens and chat markers
        train_set = CopyMix(train_set, data.copy_fraction, ordinary_ids(tokenizer.vocab_size, reserved), cfg.seed)
    return train_set, val_set


def default_cache_dir() -> Path:
    """The token shards' cache when data.cache_dir is not set: files.cache_home() / tokens."""
    return cache_home() / "tokens"
