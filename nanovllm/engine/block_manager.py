"""Physical KV-cache blocks: ref counts, prefix sharing by hash, copy-on-write."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence


@dataclass
class CacheStats:
    """Counters the engine exposes: prefix-cache hits and copy-on-write copies."""

    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    block_copies: int = 0
    peak_used_blocks: int = 0


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: list[int] = []


def block_hash(token_ids: list[int], prefix_hash: int) -> int:
    """xxhash of one full block's tokens, chained with the previous block's hash."""
    h = xxhash.xxh64()
    if prefix_hash != -1:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class BlockManager:
    """Hands out fixed-size blocks to sequences' block tables.

    A block with ref count 0 sits in the free list, oldest-freed first. It keeps
    its hash, so a later prompt with the same prefix can take it back until it
    is handed out for other tokens. Only full, computed blocks are hashed, so a
    prefix hit never points at K/V that is not there yet.

    Blocks are shared after a prefix hit or `fork`. A sequence never writes into
    a shared block: `append_slots` first gives it a private copy and records the
    (src, dst) pair, which the model runner copies before its next forward.

    With `num_sink_blocks` S > 0, blocks 0..S-1 hold sequences' first blocks and only those (an
    FP8 cache keeps their K/V, the attention sinks, in float16 beside it: `KVCache`); every other
    block comes from S..N-1. Each range has its own free list.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_sink_blocks: int = 0):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        if not 0 <= num_sink_blocks < num_blocks:
            raise ValueError(f"num_sink_blocks must be in [0, {num_blocks}), got {num_sink_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_sink_blocks = num_sink_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        # [first blocks, the rest]; without sink blocks the first list stays empty
        self.free_lists: list[OrderedDict[int, None]] = [OrderedDict.fromkeys(range(num_sink_blocks)),
                                                         OrderedDict.fromkeys(range(num_sink_blocks, num_blocks))]
        self.hash_to_block_id: dict[int, int] = {}
        self.pending_copies: list[tuple[int, int]] = []
        self.stats = CacheStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def free_block_ids(self) -> list[int]:
        """The free blocks, sink blocks first, each range oldest-freed first."""
        return [*self.free_lists[0], *self.free_lists[1]]

    @property
    def num_free_blocks(self) -> int:
        return sum(map(len, self.free_lists))

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - self.num_free_blocks

    @property
    def max_blocks_per_seq(self) -> int:
        """The most blocks one sequence can hold: one sink block and all the others."""
        return len(self.blocks) - self.num_sink_blocks + (self.num_sink_blocks > 0)

    def num_blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # -- allocation -----------------------------------------------------------

    def _free_list(self, index: int) -> OrderedDict[int, None]:
        """The free list that a sequence's block at table index `index` comes from."""
        return self.free_lists[0] if index == 0 and self.num_sink_blocks else self.free_lists[1]

    def _home(self, block_id: int) -> OrderedDict[int, None]:
        """The free list block `block_id` goes back to."""
        return self.free_lists[0] if block_id < self.num_sink_blocks else self.free_lists[1]

    def _enough_free(self, indices: list[int]) -> bool:
        """Whether a free block is there for each of these table indices, each from its own range."""
        firsts = sum(i == 0 for i in indices) if self.num_sink_blocks else 0
        return firsts <= len(self.free_lists[0]) and len(indices) - firsts <= len(self.free_lists[1])

    def _take_free_block(self, index: int) -> int:
        """A free block for table index `index`, out of its free list (oldest-freed first)."""
        free = self._free_list(index)
        assert free, "callers check the free count first"
        block_id, _ = free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids, block.ref_count = -1, [], 1
        self.stats.peak_used_blocks = max(self.stats.peak_used_blocks, self.num_used_blocks)
        return block_id

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._home(block_id)[block_id]
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"block {block_id} released twice"
        block.ref_count -= 1
        if block.ref_count == 0:
            self._home(block_id)[block_id] = None

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks matching seq's leading full blocks.

        The last token is never a hit: the forward must compute at least one
        token to produce the next token's logits.
        """
        if not self.enable_prefix_caching:
            return []
        hits, prev_hash, bs = [], -1, self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            prev_hash = block_hash(tokens, prev_hash)
            block_id = self.hash_to_block_id.get(prev_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.

        Returns False, changing nothing, when the free blocks do not suffice.
        """
        assert not seq.block_table, f"sequence {seq.seq_id} already has blocks"
        hits = self._prefix_hits(seq)
        revived = [i for i, b in enumerate(hits) if self.blocks[b].ref_count == 0]  # they leave a free list
        fresh = list(range(len(hits), self.num_blocks_for(seq.num_tokens)))
        if not self._enough_free(revived + fresh):
            return False
        for block_id in hits:
            self._acquire(block_id)
        seq.block_table = hits + [self._take_free_block(i) for i in fresh]
        seq.num_computed_tokens = seq.num_committed_tokens = len(hits) * self.block_size
        self.stats.prefix_query_tokens += seq.num_tokens
        self.stats.prefix_hit_tokens += seq.num_computed_tokens
        return True

    def free(self, seq: Sequence) -> None:
        """Drop seq's blocks, tail first so its prefix stays cached longest."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_committed_tokens = 0

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let child share every block of parent (copy-on-write later)."""
        assert not child.block_table, f"sequence {child.seq_id} already has blocks"
        for block_id in parent.block_table:
            self._acquire(block_id)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_committed_tokens = parent.num_committed_tokens

    # -- appending ------------------------------------------------------------

    def append_slots(self, seq: Sequence, num_lookahead: int = 0) -> bool:
        """Make seq's table cover all its tokens and `num_lookahead` more (speculative
        proposals to come), with private blocks where it will write.

        Returns False, changing nothing, when the free blocks do not suffice.
        """
        table, bs = seq.block_table, self.block_size
        needed = -(-(len(seq.token_ids) + num_lookahead) // bs)
        first = seq.num_computed_tokens // bs
        if needed == first + 1 <= len(table) and self.blocks[table[first]].ref_count == 1:
            return True  # a decode step's usual case: it writes into its own last block
        new = list(range(len(table), needed))
        # the blocks it writes into that others share: copied on write
        shared = [i for i in range(first, min(len(table), needed)) if self.blocks[table[i]].ref_count > 1]
        if not self._enough_free(shared + new):
            return False
        for i in shared:
            src = seq.block_table[i]
            dst = self._take_free_block(i)
            self._release(src)
            seq.block_table[i] = dst
            self.pending_copies.append((src, dst))
            self.stats.block_copies += 1
        seq.block_table.extend(self._take_free_block(i) for i in new)
        return True

    def free_tail(self, seq: Sequence) -> None:
        """Release the blocks past those seq's tokens fill: after a speculative step they held
        only rejected proposals (or reserved slots no proposal used). They were private."""
        keep = self.num_blocks_for(seq.num_tokens)
        for block_id in reversed(seq.block_table[keep:]):
            assert self.blocks[block_id].ref_count == 1 and self.blocks[block_id].hash == -1
            self._release(block_id)
        del seq.block_table[keep:]

    def take_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) block copies to run before the next forward."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # -- hashing computed blocks ---------------------------------------------

    def commit(self, seq: Sequence) -> None:
        """Hash seq's blocks that are full of committed tokens, making them prefix-cache hits."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first = seq.num_committed_tokens // bs
        while first > 0 and self.blocks[seq.block_table[first - 1]].hash == -1:
            first -= 1  # hashed blocks always form a prefix of the table
        for i in range(first, seq.num_committed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            prev_hash = self.blocks[seq.block_table[i - 1]].hash if i > 0 else -1
            block.token_ids = seq.token_ids[i * bs : (i + 1) * bs]
            block.hash = block_hash(block.token_ids, prev_hash)
            self.hash_to_block_id.setdefault(block.hash, block.block_id)
