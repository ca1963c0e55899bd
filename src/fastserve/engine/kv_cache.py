"""Paged KV cache bookkeeping: block pool, per-request block tables, prefix cache, host swap tier.

    kv = KVCacheManager(num_blocks=64, block_size=16, num_host_blocks=32)
    hits, num_hit_tokens = kv.get_computed_blocks(request)       # longest cached prefix
    new_blocks = kv.allocate_slots(request, num_new_tokens, (hits, num_hit_tokens))  # or None
    ... the runner writes the step's K/V, the scheduler advances num_computed_tokens ...
    kv.free(request)                                             # on finish / preemption

A request's block table maps its token positions to device blocks (block_size = 4 here):

    tokens      t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .. ..
    table       [    7      ,      2      ,     9      ]   p -> slot 4 * table[p // 4] + p % 4
    hash chain  h0 = H(ROOT, (t0..t3))   h1 = H(h0, (t4..t7))   (block 9 is not full: no hash)

A full block is identified by its hash chain, so two requests whose first k blocks hold the same
tokens share those k device blocks (ref_cnt = 2). A block is hashed and registered when it is
allocated for tokens that fill it in the coming step (vLLM v1), so a request admitted later in
the same step already shares it. That is safe because the step's K/V are all written before any
attention reads them (PagedAttention.attend: write_kv, then attention, layer by layer), and a
scheduled request is never preempted within its step.

Free queue (LRU): a block whose ref_cnt drops to 0 is appended at the tail; allocation pops from
the head. A free block that still carries a hash is a *cached* block: a prefix hit revives it
(removed from the queue, ref_cnt 1) until allocation reaches it at the head and evicts its hash.
A request's blocks are freed tail first, so the end of a sequence is evicted before its prefix.

    free queue  head -> [ 5 ][ 3 (h=a1) ][ 8 ][ 1 (h=c0) ] <- tail   allocate(2): 5, 3 (a1 evicted)

Host tier: a second pool of `num_host_blocks` with no prefix caching. `swap_out` gives the
(device, host) block pairs to copy before the next step and releases the device blocks (ref_cnt--,
like free: shared blocks stay with their other owners); `swap_in` the reverse with fresh device
blocks. A copy list may reuse a block another pair of the same step released: the runner does all
reads before all writes.

What it does not know: tensors (the runner owns the K/V memory), scheduling policy, sampling.
It reads only request_id, num_computed_tokens, num_tokens, all_token_ids and the prompt logprobs
settings (sampling_params.prompt_logprobs, prompt_logprobs_start) of a request.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

ROOT_HASH = 0x5EED  # parent hash of a sequence's first block


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """Chained hash of one full block: equal (up to 64-bit hash odds) iff the whole prefix is."""
    return hash((parent_hash, token_ids))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0  # requests whose table holds this block; 0 -> in the free queue
    block_hash: int | None = None  # set while the block is registered in the prefix cache


class BlockPool:
    """Device blocks with ref counts, an LRU free queue and the hash -> block prefix cache.

    Invariants: a block is in the free queue iff ref_cnt == 0; `cached[h] == b` iff
    blocks[b].block_hash == h (at most one block per hash).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> None, in LRU order (head = next to allocate); O(1) removal from the middle.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now (unreferenced, cached or not)."""
        return len(self.free_queue)

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)

    def allocate(self, n: int) -> list[int]:
        """Pop n blocks from the head of the free queue (evicting their hashes); ref_cnt 1."""
        if n > len(self.free_queue):
            raise ValueError(f"cannot allocate {n} blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            bid, _ = self.free_queue.popitem(last=False)
            block = self.blocks[bid]
            if block.block_hash is not None:  # LRU eviction of a cached block
                del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(bid)
        return out

    def touch(self, block_ids: list[int]) -> None:
        """Take one more reference (a prefix hit); revive blocks that sat in the free queue."""
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_cnt == 0:
                del self.free_queue[bid]
            block.ref_cnt += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference each, in the given order; unreferenced blocks go to the tail."""
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {bid} freed with ref_cnt {block.ref_cnt}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[bid] = None

    def register(self, block_id: int, block_hash: int) -> None:
        """Put a full, computed block in the prefix cache (first block wins for a hash)."""
        block = self.blocks[block_id]
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block_id


class KVCacheManager:
    """Per-request block tables over a `BlockPool`, the prefix cache and the host swap tier."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        num_host_blocks: int = 0,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_host_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.num_host_blocks = num_host_blocks
        self.free_host_blocks: list[int] = list(range(num_host_blocks - 1, -1, -1))  # a stack
        self.tables: dict[str, list[int]] = {}  # request id -> device blocks, position order
        self.host_tables: dict[str, list[int]] = {}  # request id -> host blocks (swapped out)
        self._hashes: dict[str, list[int]] = {}  # request id -> hash chain of its full blocks
        self._num_registered: dict[str, int] = {}  # leading table blocks already in the cache
        self.prefix_queries_tokens = 0  # prompt tokens looked up at admission
        self.prefix_hits_tokens = 0  # of those, tokens served from the prefix cache

    # ---- gauges ----------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_free_host_blocks(self) -> int:
        return len(self.free_host_blocks)

    @property
    def usage(self) -> float:
        """Fraction of device blocks referenced by a request (cached-but-free blocks count free)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    @property
    def prefix_queries(self) -> int:
        """Tokens looked up in the prefix cache at admission (= prefix_queries_tokens)."""
        return self.prefix_queries_tokens

    @property
    def prefix_hits(self) -> int:
        """Of those, tokens served by the prefix cache (= prefix_hits_tokens)."""
        return self.prefix_hits_tokens

    @property
    def prefix_hit_rate(self) -> float:
        return (
            self.prefix_hits_tokens / self.prefix_queries_tokens
            if self.prefix_queries_tokens
            else 0.0
        )

    def block_table(self, request_id: str) -> list[int]:
        """Device blocks of the request (a copy; empty when it holds none)."""
        return list(self.tables.get(request_id, ()))

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self.tables

    def is_swapped(self, request_id: str) -> bool:
        return request_id in self.host_tables

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ---- prefix cache ----------------------------------------------------------------------------

    def _block_hashes(self, request, num_blocks: int) -> list[int]:
        """The request's hash chain extended to its first `num_blocks` full blocks (memoized:
        token ids only ever get appended, so earlier hashes never change)."""
        hashes = self._hashes.setdefault(request.request_id, [])
        if len(hashes) < num_blocks:
            ids, bs = request.all_token_ids, self.block_size
            parent = hashes[-1] if hashes else ROOT_HASH
            for i in range(len(hashes), num_blocks):
                parent = hash_block(parent, tuple(ids[i * bs : (i + 1) * bs]))
                hashes.append(parent)
        return hashes[:num_blocks]

    def get_computed_blocks(self, request) -> tuple[list[int], int]:
        """Longest cached prefix of full blocks of a request that holds no blocks:
        (block ids, number of tokens they cover). Never the whole sequence: the last token is
        always left to compute so the step produces logits. A request that asks for prompt
        logprobs computes every position whose logits give one: its whole prompt (as in vLLM), or
        from prompt_logprobs_start - 1 on (position p predicts token p + 1)."""
        if not self.enable_prefix_caching or request.request_id in self.tables:
            return [], 0
        max_cached = request.num_tokens - 1
        params = request.sampling_params
        if params.prompt_logprobs is not None:
            max_cached = min(max_cached, params.prompt_logprobs_start - 1)
        if max_cached <= 0:
            return [], 0
        max_blocks = max_cached // self.block_size
        hits = []
        for h in self._block_hashes(request, max_blocks):
            bid = self.pool.lookup(h)
            if bid is None:
                break
            hits.append(bid)
        return hits, len(hits) * self.block_size

    def _register(self, request, num_tokens: int) -> None:
        """Register the request's blocks that its first num_tokens fill in the prefix cache."""
        if not self.enable_prefix_caching or request.request_id not in self.tables:
            return
        table = self.tables[request.request_id]
        num_full = min(num_tokens // self.block_size, len(table))
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(start, num_full):
            self.pool.register(table[i], hashes[i])
        self._num_registered[request.request_id] = num_full

    # ---- allocation ------------------------------------------------------------------------------

    def num_blocks_needed(self, request, num_new_tokens: int, computed_blocks=None) -> int:
        """Free blocks `allocate_slots` would consume (new blocks + revived cached hits)."""
        hits, hit_tokens = computed_blocks or ([], 0)
        table = self.tables.get(request.request_id, [])
        total = request.num_computed_tokens + hit_tokens + num_new_tokens
        new = max(0, self.blocks_for_tokens(total) - len(table) - len(hits))
        revived = sum(1 for b in hits if self.pool.blocks[b].ref_cnt == 0)
        return new + revived

    def allocate_slots(
        self, request, num_new_tokens: int, computed_blocks=None
    ) -> list[int] | None:
        """Make room for num_computed_tokens (+ hit tokens) + num_new_tokens; return the NEW block
        ids, or None (nothing changed) when the free blocks do not suffice. `computed_blocks` is
        get_computed_blocks' result, only for a request that holds no blocks; the caller then sets
        num_computed_tokens += hit tokens. Blocks these tokens fill are registered at once: the
        caller must compute the tokens in the coming step."""
        rid = request.request_id
        hits, hit_tokens = computed_blocks or ([], 0)
        if hits and rid in self.tables:
            raise ValueError(f"request {rid} already holds blocks; computed_blocks must be empty")
        if self.num_blocks_needed(request, num_new_tokens, computed_blocks) > self.num_free_blocks:
            return None
        if rid not in self.tables:  # admission: count the prefix-cache lookup
            self.prefix_queries_tokens += request.num_tokens
            self.prefix_hits_tokens += hit_tokens
        table = self.tables.setdefault(rid, [])
        self.pool.touch(hits)
        table.extend(hits)
        self._num_registered[rid] = max(self._num_registered.get(rid, 0), len(hits))
        total = request.num_computed_tokens + hit_tokens + num_new_tokens
        new = self.pool.allocate(max(0, self.blocks_for_tokens(total) - len(table)))
        table.extend(new)
        self._register(request, total)
        return new

    def num_releasable_blocks(self, request_ids) -> int:
        """Device blocks that would become free if all these requests released theirs."""
        refs: dict[int, int] = {}
        for rid in request_ids:
            for b in self.tables.get(rid, ()):
                refs[b] = refs.get(b, 0) + 1
        return sum(1 for b, n in refs.items() if self.pool.blocks[b].ref_cnt == n)

    def free(self, request) -> None:
        """Release every device and host block of the request and forget it. Cached blocks stay
        in the prefix cache (evictable) until allocation reuses them."""
        rid = request.request_id
        self.pool.free(list(reversed(self.tables.pop(rid, []))))
        self.free_host_blocks.extend(reversed(self.host_tables.pop(rid, [])))
        self._hashes.pop(rid, None)
        self._num_registered.pop(rid, None)

    # ---- host swap tier --------------------------------------------------------------------------

    def can_swap_out(self, request) -> bool:
        table = self.tables.get(request.request_id)
        return bool(table) and len(table) <= len(self.free_host_blocks)

    def swap_out(self, request) -> list[tuple[int, int]]:
        """Move the request's KV to the host tier: (device block, host block) copy pairs."""
        rid = request.request_id
        if not self.can_swap_out(request):
            raise ValueError(f"cannot swap out request {rid}")
        table = self.tables.pop(rid)
        host = [self.free_host_blocks.pop() for _ in table]
        self.host_tables[rid] = host
        self.pool.free(list(reversed(table)))
        self._num_registered[rid] = 0  # re-registered from the swapped-in blocks later
        return list(zip(table, host))

    def can_swap_in(self, request) -> bool:
        host = self.host_tables.get(request.request_id)
        return host is not None and len(host) <= self.num_free_blocks

    def swap_in(self, request) -> list[tuple[int, int]]:
        """Bring the request's KV back into fresh device blocks: (host block, device block)."""
        rid = request.request_id
        if not self.can_swap_in(request):
            raise ValueError(f"cannot swap in request {rid}")
        host = self.host_tables.pop(rid)
        table = self.pool.allocate(len(host))
        self.tables[rid] = table
        self.free_host_blocks.extend(reversed(host))
        return list(zip(host, table))
