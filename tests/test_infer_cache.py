"""The paged latent cache: allocation, rollback, and cached attention == the full forward (absorbed and naive)."""
from __future__ import annotations

import pytest
import torch
from infer_support import one_thread, randomized  # noqa: F401  (autouse fixture)

from longcat_flash.infer.cache import CacheConfig, CacheFull, PagedLatentCache
from longcat_flash.presets import tiny


def small_cache(pages: int = 9, page_size: int = 4, dtype=torch.float32, absorb_max_tokens: int = 16
                ) -> PagedLatentCache:
    return PagedLatentCache(CacheConfig.for_model(tiny(), max_tokens=(pages - 1) * page_size, page_size=page_size,
                                                  dtype=dtype), absorb_max_tokens=absorb_max_tokens)


def always(absorb: bool) -> int:
    """The `absorb_max_tokens` that sends every batch down one attention path."""
    return 10**9 if absorb else 0


def test_pages_are_allocated_truncated_and_freed():
    cache = small_cache()
    assert cache.free_pages == 8 and cache.config.num_blocks == 5  # 2 layers x 2 blocks + the MTP block
    cache.ensure(7, 9)  # positions 0..8 -> 3 pages of 4
    cache.ensure(7, 12)  # still 3
    assert cache.capacity(7) == 12 and cache.free_pages == 5
    cache.truncate(7, 5)  # speculative rollback: keep positions 0..4 -> 2 pages
    assert cache.capacity(7) == 8 and cache.free_pages == 6
    cache.ensure(8, 24)  # takes the last 6 pages
    with pytest.raises(CacheFull):
        cache.ensure(9, 1)
    cache.free(7)
    cache.free(8)
    assert cache.free_pages == 8 and cache.used_pages == 0 and not cache.tables


def test_view_reads_the_pages_a_sequence_holds_now():
    """A view's rows follow the page table after it changes (a page added, a rollback, its pages handed to
    another sequence and new ones taken), never the rows an earlier view read."""
    cache, G = small_cache(), 4

    def rows(seq: int, n: int) -> list[int]:
        return [cache.tables[seq][p // G] * G + p % G for p in range(n)]

    cache.ensure(7, 9)
    assert cache.view([7], torch.tensor([[8]])).read.tolist() == rows(7, 9)
    cache.ensure(7, 13)  # a fourth page
    assert cache.view([7], torch.tensor([[12]])).read.tolist() == rows(7, 13)
    cache.truncate(7, 4)  # back to one page; another sequence takes the freed ones, then 7 grows again
    cache.ensure(8, 12)
    cache.ensure(7, 13)
    assert cache.view([7], torch.tensor([[12]])).read.tolist() == rows(7, 13)
    assert cache.view([7, 8], torch.tensor([[12], [11]])).read.tolist() == rows(7, 13) + rows(8, 12) + [0]
    cache.free(7)
    cache.ensure(7, 5)  # the same id, a new sequence
    assert cache.view([7], torch.tensor([[4]])).read.tolist() == rows(7, 5)


def test_view_writes_by_position_and_masks_causally():
    cache = small_cache()
    cache.ensure(0, 6)
    cache.ensure(1, 3)
    positions = torch.tensor([[4, 5], [2, -1]])  # row 1 is padded
    view = cache.view([0, 1], positions)
    C, R = 16, 8
    latent = torch.arange(2 * 2 * C, dtype=torch.float32).view(2, 2, C)
    k_rope = -torch.arange(2 * 2 * R, dtype=torch.float32).view(2, 2, R)
    lat, rope, mask = view.update(3, latent, k_rope)
    assert lat.shape == (2, 6, C) and rope.shape == (2, 6, R) and mask.shape == (2, 2, 6)
    torch.testing.assert_close(lat[0, 4:6], latent[0])
    torch.testing.assert_close(lat[1, 2], latent[1, 0])
    torch.testing.assert_close(rope[0, 4:6], k_rope[0])
    assert mask[0, 0].tolist() == [True] * 5 + [False]
    assert mask[1, 0].tolist() == [True] * 3 + [False] * 3
    assert mask[1, 1].tolist() == [True] + [False] * 5  # padding sees one slot, never an empty row


def test_a_batch_of_first_chunks_attends_causally_without_a_mask():
    """Rows that all start at position 0 with no padding need no mask: SDPA runs causal (faster), decided on the
    host. Any other batch (a later chunk, a padded row, the absorbed path) gets its mask."""
    cache = small_cache(absorb_max_tokens=2)
    for seq in (0, 1):
        cache.ensure(seq, 8)
    latent, k_rope = torch.zeros(2, 3, 16), torch.zeros(2, 3, 8)

    def mask(positions: list[list[int]], absorb_max_tokens: int = 2) -> torch.Tensor | None:
        cache.absorb_max_tokens = absorb_max_tokens
        return cache.view([0, 1], torch.tensor(positions)).update(0, latent, k_rope)[2]

    assert mask([[0, 1, 2], [0, 1, 2]]) is None
    assert mask([[3, 4, 5], [0, 1, 2]]) is not None  # row 0 continues its prompt
    assert mask([[0, 1, 2], [0, 1, -1]]) is not None  # row 1 is padded
    assert mask([[0, 1, 2], [0, 1, 2]], absorb_max_tokens=3) is not None  # the absorbed path reads the mask


def test_each_view_carries_its_batchs_attention_path():
    cache = small_cache(absorb_max_tokens=2)
    cache.ensure(0, 8)
    assert cache.view([0], torch.arange(2)[None]).absorb  # 2 new tokens per row: absorbed
    assert not cache.view([0], torch.arange(3)[None]).absorb  # 3: naive, and the earlier view is unchanged


def run_paged(model, seqs: list[list[int]], split: int, absorb: bool) -> list[torch.Tensor]:
    """Prefill each sequence up to `split` in one padded batch, then decode the rest one token per step, every
    forward on the absorbed (or the naive) attention path."""
    cache = small_cache(pages=33, absorb_max_tokens=always(absorb))
    ids = list(range(len(seqs)))
    for i, s in enumerate(seqs):
        cache.ensure(i, len(s))
    S = max(min(split, len(s)) for s in seqs)
    tokens = torch.zeros(len(seqs), S, dtype=torch.long)
    positions = torch.full((len(seqs), S), -1)
    for i, s in enumerate(seqs):
        n = min(split, len(s))
        tokens[i, :n], positions[i, :n] = torch.tensor(s[:n]), torch.arange(n)
    logits = model(tokens, positions.clamp(min=0), cache.view(ids, positions)).logits
    out = [[logits[i, : min(split, len(s))]] for i, s in enumerate(seqs)]
    for t in range(split, max(map(len, seqs))):
        live = [i for i, s in enumerate(seqs) if t < len(s)]
        step_pos = torch.full((len(live), 1), t)
        step = model(torch.tensor([[seqs[i][t]] for i in live]), step_pos, cache.view(live, step_pos)).logits
        for row, i in enumerate(live):
            out[i].append(step[row])
    return [torch.cat(parts) for parts in out]


@pytest.mark.parametrize("absorb", [True, False])
def test_incremental_paged_decode_equals_full_forward(absorb):
    model = randomized()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (11, 6, 14)]
    with torch.no_grad():
        paged = run_paged(model, seqs, split=5, absorb=absorb)
        for seq, got in zip(seqs, paged):
            torch.testing.assert_close(got, model(torch.tensor([seq])).logits[0], atol=2e-5, rtol=1e-4)


def test_absorbed_equals_naive_over_a_padded_paged_batch():
    model = randomized()
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 4)]
    with torch.no_grad():
        results = [run_paged(model, seqs, split=3, absorb=absorb) for absorb in (True, False)]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_a_pool_the_device_cannot_allocate_is_one_error_naming_its_size():
    """`longcat serve --cache-tokens 1000000000` was the allocator's traceback ("can't allocate memory: you tried to
    allocate 2560000040960 bytes"). 2^40 pages: past any address space, so refused even where memory overcommits."""
    with pytest.raises(ValueError, match=r"the latent cache for 17592186044400 tokens \(cache_tokens, --cache-tokens\) "
                                         r"takes 4194304.0 GiB, which cpu could not allocate"):
        PagedLatentCache(CacheConfig(num_blocks=2, width=64, kv_lora_rank=48, page_size=16, num_pages=2**40))
