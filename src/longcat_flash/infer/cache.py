"""Paged latent KV cache: a preallocated pool of fixed-size pages, per-sequence page tables, rollback.

What is stored (docs/architecture.md §6.2, docs/latent_cache.md): per attention block and token, only the normalised,
scaled latent `c` (C values) and the rotated rope key (R values), side by side in one row of C+R values, the
MQA-style layout SGLang/vLLM use. The expanded per-head K/V are never cached; the absorbed decode path attends
over these rows directly.

Slots are indexed by position: the entry for position p of a sequence lives in slot p of its page table, so the
trunk and the MTP head (its own block index, `num_attention_blocks`) share one table, rollback after speculative
verification is a truncation, and a query at position p may attend to exactly the slots 0..p.

Forked sequences (`n` copies of one prompt) share the prompt's full pages read-only, counted by `_users`; a page
goes back to the pool when its last user truncates past it or is freed (docs/latent_cache.md, "Forks").

Page 0 is a scratch page that is never handed out: padded query rows write there and padded read slots point there
(always masked out), so a padded batch needs no branches.

Shapes: A attention blocks (+1 with MTP), P pages, G page size, B batch, S new tokens, L attended length,
C kv_lora_rank, R qk_rope_head_dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig

SCRATCH_PAGE = 0
ABSORB_MAX_TOKENS = 16  # rows of at most this many new tokens attend absorbed; longer ones naive


def padded_batch(rows: list[list[int]], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids of different lengths, row b at positions starts[b].. -> host tensors ids (B, S), padded
    with 0, and positions (B, S), padded with -1 (the convention `view` reads). On the host because `view` reads
    the positions there; the model gets copies on its device."""
    S = max(map(len, rows))
    ids = [row + [0] * (S - len(row)) for row in rows]
    positions = [[*range(start, start + len(row)), *[-1] * (S - len(row))] for row, start in zip(rows, starts)]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long)


class CacheFull(RuntimeError):
    """The pool has no free page left for a sequence; the scheduler avoids this by planning page use."""


@dataclass(frozen=True)
class CacheConfig:
    num_blocks: int  # attention blocks that own a slice of the pool (trunk + MTP)
    width: int  # C + R values per token and block
    kv_lora_rank: int  # C: where a row splits into latent | k_rope
    page_size: int = 16  # G tokens per page
    num_pages: int = 4096  # P, including the scratch page
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.num_pages < 2:
            raise ValueError(f"CacheConfig needs page_size >= 1 and num_pages >= 2 (page 0 is scratch), "
                             f"got page_size={self.page_size}, num_pages={self.num_pages}")

    @classmethod
    def for_model(cls, cfg: ModelConfig, *, max_tokens: int, page_size: int = 16, with_mtp: bool = True,
                  dtype: torch.dtype = torch.bfloat16) -> CacheConfig:
        """A pool holding `max_tokens` tokens in total (over all sequences) for every block of `cfg`."""
        blocks = cfg.num_attention_blocks + (1 if with_mtp and cfg.num_nextn_predict_layers else 0)
        pages = -(-max_tokens // page_size) + 1
        return cls(num_blocks=blocks, width=cfg.kv_lora_rank + cfg.qk_rope_head_dim, kv_lora_rank=cfg.kv_lora_rank,
                   page_size=page_size, num_pages=pages, dtype=dtype)


class PagedLatentCache:
    """The pool, a free list of pages and one page table per sequence. Not thread-safe: one engine owns it.

    Each view also carries its batch's attention path (LatentCache.absorb): absorbed for rows of at most
    `absorb_max_tokens` new tokens, where it is cheaper (decode, drafts), naive for longer prefill chunks
    (docs/architecture.md §6.3). The rule lives here so the trunk's and the MTP head's forwards follow it alike."""

    def __init__(self, config: CacheConfig, device: str | torch.device = "cpu",
                 absorb_max_tokens: int = ABSORB_MAX_TOKENS) -> None:
        self.config, self.absorb_max_tokens = config, absorb_max_tokens
        G, P = config.page_size, config.num_pages
        try:
            self.pool = torch.zeros(config.num_blocks, P * G, config.width, dtype=config.dtype,
                                    device=device)  # (A, P*G, C+R)
        except RuntimeError as err:  # torch.OutOfMemoryError too: a traceback from the allocator otherwise
            size = config.num_blocks * P * G * config.width * config.dtype.itemsize
            raise ValueError(f"the latent cache for {(P - 1) * G} tokens (cache_tokens, --cache-tokens) takes "
                             f"{size / 2**30:.1f} GiB, which {device} could not allocate ({type(err).__name__}); "
                             "give fewer tokens") from None
        self.blocks = self.pool.unbind(0)  # (P*G, C+R) each: a block's pool, taken without an op per layer and step
        self._free = list(range(P - 1, SCRATCH_PAGE, -1))  # pop() hands out low page ids first
        self._users = [0] * P  # sequences whose table holds each page (> 1 only for pages shared by forks)
        self.tables: dict[int, list[int]] = {}
        self._rows: dict[int, tuple[list[int], torch.Tensor]] = {}  # per sequence: its table when read, its pool rows

    # ---- allocation ----
    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.config.num_pages - 1 - len(self._free)

    def pages_for(self, n_positions: int) -> int:
        return -(-n_positions // self.config.page_size)

    def shared_pages(self, seq: int) -> int:
        """Pages of the sequence that other sequences use too: freeing it would not return them to the pool."""
        return sum(self._users[page] > 1 for page in self.tables.get(seq, ()))

    def capacity(self, seq: int) -> int:
        """Positions the sequence's pages cover."""
        return len(self.tables.get(seq, ())) * self.config.page_size

    def ensure(self, seq: int, n_positions: int) -> None:
        """Grow the sequence's table to cover positions [0, n_positions)."""
        missing = self.pages_for(n_positions) - len(self.tables.get(seq, ()))
        if missing > len(self._free):
            raise CacheFull(f"sequence {seq} needs {missing} more pages, {len(self._free)} free")
        self.tables.setdefault(seq, []).extend(self._take() for _ in range(max(missing, 0)))

    def _take(self) -> int:
        page = self._free.pop()
        self._users[page] = 1
        return page

    def _release(self, pages: list[int]) -> None:
        """Drop one user of each page; a page nobody uses any more goes back to the pool."""
        for page in reversed(pages):
            self._users[page] -= 1
            if not self._users[page]:
                self._free.append(page)

    def shared_positions(self, n_positions: int) -> int:
        """Positions a fork at n_positions shares: the whole pages below the one holding position n_positions - 1."""
        return (n_positions - 1) // self.config.page_size * self.config.page_size

    def fork(self, src: int, dst: int, n_positions: int) -> None:
        """Give `dst` the cache of positions [0, n_positions) of `src` without recomputing it.

        Whole pages below the last position are shared read-only: no sequence writes there again (speculative
        rollback never truncates under the prompt; a preempted copy frees its table and recomputes into fresh
        pages). The page holding position n_positions - 1 is copied (copy-on-write done eagerly): each sequence
        writes its next positions there, and the MTP head's entry at n_positions - 1 reads each one's own next
        token. Needs one free page.
        """
        G, table = self.config.page_size, self.tables[src]
        full = self.shared_positions(n_positions) // G
        if not self._free:
            raise CacheFull(f"forking sequence {src} needs a free page, none left")
        shared = table[:full]
        for page in shared:
            self._users[page] += 1
        page = self._take()
        self.pool[:, page * G:(page + 1) * G] = self.pool[:, table[full] * G:(table[full] + 1) * G]  # (A, G, C+R)
        self.tables[dst] = [*shared, page]

    def truncate(self, seq: int, n_positions: int) -> None:
        """Keep positions [0, n_positions) (speculative rollback); whole pages past the end go back to the pool.

        Stale slots inside the last kept page need no clearing: a query at position p only reads slots <= p, and
        every position is rewritten before any query at or after it runs again.
        """
        table = self.tables.get(seq, [])
        keep = self.pages_for(n_positions)
        self._release(table[keep:])
        del table[keep:]

    def free(self, seq: int) -> None:
        """Return all pages of a finished, cancelled or preempted sequence."""
        self.truncate(seq, 0)
        self.tables.pop(seq, None)
        self._rows.pop(seq, None)

    # ---- one forward ----
    def view(self, seqs: list[int], positions: torch.Tensor) -> BatchView:
        """The LatentCache one forward uses: row b of the batch is sequence seqs[b]; positions (B, S), -1 = padding.

        `positions` is a host tensor: the page tables are host data, so the slot arithmetic runs on the host and
        only its results (write/read rows, mask) go to the pool's device, with no device-to-host sync.
        Every non-padding position must be covered by `ensure` beforehand.
        """
        if positions.device.type != "cpu":
            raise ValueError(f"PagedLatentCache.view takes host positions, got a tensor on {positions.device}")
        B, S = positions.shape
        L = int(positions.max()) + 1
        read = torch.stack([self._pool_rows(seq, L) for seq in seqs])  # (B, L) pool rows
        pad = positions < 0
        write = read.gather(1, positions.clamp(min=0)).masked_fill_(pad, SCRATCH_PAGE * self.config.page_size)
        mask = torch.arange(L) <= positions[:, :, None]  # (B, S, L) causal by position
        mask[:, :, 0] |= pad  # padded queries see one (scratch-safe) slot, so no softmax row is empty
        write, read, mask = (t.to(self.pool.device, non_blocking=True)
                             for t in (write.reshape(-1), read.reshape(-1), mask))  # (B*S,), (B*L,), (B, S, L)
        absorb = S <= self.absorb_max_tokens
        causal = not absorb and S == L and torch.equal(positions, torch.arange(S).expand(B, S))  # first chunks
        return BatchView(self, write, read, mask, (B, S, L), absorb=absorb, causal=causal)

    def _pool_rows(self, seq: int, L: int) -> torch.Tensor:
        """The pool rows (L,) of the sequence's positions 0..L-1, scratch rows past its table (they are masked). Kept
        per sequence while its table is unchanged: decode asks every step, and the table changes once a page."""
        table = self.tables[seq]
        kept = self._rows.get(seq)
        if kept is None or kept[0] != table:
            G = self.config.page_size
            rows = (torch.tensor(table, dtype=torch.long)[:, None] * G + torch.arange(G)).view(-1)  # (pages * G,)
            kept = self._rows[seq] = list(table), rows
        rows = kept[1]
        if rows.numel() >= L:
            return rows[:L]
        return torch.cat([rows, torch.full((L - rows.numel(),), SCRATCH_PAGE * self.config.page_size)])


class BatchView:
    """Implements model.attention.LatentCache for one forward over a fixed set of rows and positions."""

    def __init__(self, cache: PagedLatentCache, write: torch.Tensor, read: torch.Tensor, mask: torch.Tensor,
                 shape: tuple[int, int, int], absorb: bool, causal: bool = False) -> None:
        self.cache, self.write, self.read, self.mask, self.shape = cache, write, read, mask, shape
        self.read_rows = read.view(shape[0], shape[2])  # (B, L): the kernels' read index, made once per forward
        self.absorb = absorb  # this forward's attention path (LatentCache.absorb)
        # Every row is a first prefill chunk (positions 0..S-1, no padding): the naive path gets mask None and
        # SDPA runs causal without a mask (~1.5x faster on CPU; decided here on the host, not by comparing masks
        # on the device, which synced every attention block on a GPU).
        self.causal = causal

    def update(self, block: int, latent: torch.Tensor, k_rope: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self.store(block, latent, k_rope)
        return *self.gather(block, latent.dtype), None if self.causal else self.mask

    def store(self, block: int, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Write this forward's latent (B, S, C) and k_rope (B, S, R) into block `block`'s pool rows."""
        B, S, _ = self.shape
        pool = self.cache.blocks[block]  # (P*G, C+R)
        pool.index_copy_(0, self.write, torch.cat([latent, k_rope], dim=-1).reshape(B * S, -1).to(pool.dtype))

    def gather(self, block: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `block`'s context as copies: latent (B, L, C) and k_rope (B, L, R) in `dtype`."""
        B, _, L = self.shape
        gathered = self.cache.blocks[block].index_select(0, self.read).view(B, L, -1).to(dtype)  # (B, L, C+R)
        C = self.cache.config.kv_lora_rank
        return gathered[..., :C], gathered[..., C:]

    def pool_rows(self, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block `block`'s pool (P*G, C+R) itself, with this forward's write index (B*S,) and read index (B, L) into
        its rows: for a kernel that stores and reads in place (decode_ops.mla_attend)."""
        return self.cache.blocks[block], self.write, self.read_rows
