"""Training data, one job per module:

    corpus.py   corpus files -> documents (str): stdlib (default, no download), directories, text, .jsonl, .parquet
    shards.py   documents -> one flat token array on disk (docs joined by eos), cached by fingerprint
    batches.py  token array -> windows of seq_len + 1 tokens -> shuffled, resumable, data-parallel batches
    copying.py  windows of random runs given twice, mixed in to teach copying from the context (data.copy_fraction)
    conversation_files.py   SFT data files (.jsonl, .json, .parquet, .arrow, folders, globs) -> rows
    conversations.py   OpenAI-format conversation rows (and TRL, ShareGPT, Alpaca ones) -> checked conversations (SFT)
    conversation_tokens.py   a conversation -> rendered with the chat template, tokens, assistant tokens marked
    conversation_packing.py   tokenized conversations -> windows with document ids, train / val splits
    tool_dialogues.py  synthetic tool-use conversations in the OpenAI format (`longcat data tools`, docs/tool_data.md)

The token-stream modules' names are importable from `longcat_flash.data` directly; the conversation modules (SFT)
are imported by their own paths.
"""
from .batches import IGNORE, PADDING, PackedBatch, ResumableSampler, TokenDataset, split_windows, validation_batches
from .copying import CopyMix, ordinary_ids
from .corpus import DOC_SUFFIXES, STDLIB, Corpus, iter_documents, sample_texts
from .shards import SHARD_FORMAT_VERSION, ShardMeta, TokenizerLike, build_token_shard

__all__ = ["DOC_SUFFIXES", "IGNORE", "PADDING", "SHARD_FORMAT_VERSION", "STDLIB", "CopyMix", "Corpus", "PackedBatch",
           "ResumableSampler", "ShardMeta", "TokenDataset", "TokenizerLike", "build_token_shard", "iter_documents",
           "ordinary_ids", "sample_texts", "split_windows", "validation_batches"]
