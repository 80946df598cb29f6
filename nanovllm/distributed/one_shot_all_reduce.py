"""A one-shot all-reduce for small messages between GPUs that can read each other's memory (NVLink).

A decode step all-reduces its activations twice per layer: 73 messages of 8 KB-4 MB per step on
Qwen3-8B. NCCL runs them as a ring with the LL protocol, latency-bound at these sizes (18 % of a
TP=2 rank's device time). Here every rank has mapped every other rank's staging buffer (torch
symmetric memory), and one kernel does the whole all-reduce: each program copies its share of
the input into its rank's buffer, tells the same program on every other rank that its share is
there, waits until they have told it the same, then sums its share of every rank's buffer over
the peer links into the output, 16 bytes per access. On two H200s it all-reduces 2 MB in 12.2 us,
against NCCL's 31.3 and torch's own `one_shot_all_reduce` (which works the same way) 21.4
(call Y; `scripts/bench_all_reduce.py` compares the three).

Synchronization, without a second barrier and without host involvement (so it replays inside
CUDA graphs): program p keeps a call counter, the epoch, and signals a peer by writing the epoch
to the peer's flag for (p, this rank). The grid is fixed, so every program of a call has the same
epoch. The staging buffer has two halves, used alternately by epoch: when a program writes a
half in call k, its peer program finished reading that half in call k - 2, since it signalled
this rank in call k - 1 only after its call k - 2 had finished (kernels on a stream run in order).
Every rank sums the ranks in the same order, so every rank gets the same bits. The two kernels
(the plain sum, and the sum fused with the residual add and RMSNorm that follow o_proj and
down_proj) share the epochs and flags: any sequence of calls of either keeps them in step.

A rank that waits longer than `wait_timeout_s` (120 s) for a peer's signal traps, which fails
the kernel with a CUDA error on that rank: a peer that died mid-step then ends in an error that
`WorkerPool.watch` names, as NCCL's timeout would, instead of a spin that never ends.

Larger messages (prefill) still go through NCCL, whose ring moves fewer bytes per rank.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import triton
import triton.language as tl

log = logging.getLogger(__name__)

MAX_BYTES = 8 << 20  # larger messages go through NCCL (scripts/bench_all_reduce.py measures where)
# Programs x elements per program per iteration. Call Y (2xH200, scripts/bench_all_reduce.py, us per
# bf16 all-reduce of 0.5 / 2 / 4 / 8 MB): 128 x 4096 took 7.3 / 12.2 / 19.0 / 33.6, 64 x 8192
# 8.6 / 13.8 / 22.9 / 41.0, NCCL 14.9 / 31.3 / 36.1 / 49.5, torch's one-shot 10.8 / 21.4 / 35.2 / 61.8.
PROGRAMS = 128
BLOCK = 4096
WAIT_TIMEOUT_S = 120.0  # a peer's signal later than this: the peer is gone (a cold compile takes seconds)


@triton.jit
def _next_epoch(epochs_ptr, pid, half_elems):
    """This program's epoch for the call (one more than its last), and the staging half it selects."""
    epoch = tl.load(epochs_ptr + pid) + 1
    tl.store(epochs_ptr + pid, epoch)
    return epoch, (epoch % 2) * half_elems


@triton.jit
def _trap():
    tl.inline_asm_elementwise("trap; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _exchange(flags_ptr, pid, epoch, timeout_ns, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Tell program `pid` of every other rank that this program's share is staged, then wait until
    each has said the same; trap after `timeout_ns` of waiting for one."""
    tl.debug_barrier()  # the whole program's share is written before the signal is released
    for r in tl.static_range(WORLD):
        if r != RANK:
            peer_flags = tl.load(flags_ptr + r).to(tl.pointer_type(tl.int64))
            tl.atomic_xchg(peer_flags + pid * WORLD + RANK, epoch, sem="release", scope="sys")
    my_flags = tl.load(flags_ptr + RANK).to(tl.pointer_type(tl.int64))
    never = tl.full((), -1, tl.int64)  # flags are >= 0: a compare-and-swap with it only reads
    for r in tl.static_range(WORLD):
        if r != RANK:
            # (a CAS, as Triton turned an atomic add of 0 into a load that the loop did not repeat)
            seen = tl.atomic_cas(my_flags + pid * WORLD + r, never, never, sem="acquire", scope="sys")
            if seen < epoch:  # (the clock is read only when waiting: the interpreter has no globaltimer)
                deadline = tl.extra.cuda.globaltimer() + timeout_ns
                while seen < epoch:
                    seen = tl.atomic_cas(my_flags + pid * WORLD + r, never, never, sem="acquire", scope="sys")
                    if tl.extra.cuda.globaltimer() > deadline:
                        _trap()
    tl.debug_barrier()


@triton.jit
def _staging(buffers_ptr, rank, half, offsets, dtype):
    """Pointers to `offsets` in rank `rank`'s staging half. The hint that every run of 16 bytes
    starts 16-byte aligned (symmetric memory is, halves and blocks of rows are multiples of 16
    bytes) lets Triton move 16 bytes per access: a pointer loaded from memory is otherwise taken as
    unaligned, and every peer read over NVLink went 2 bytes at a time (call X, 2xH200: 56.8 us per
    2 MB all-reduce against torch's one-shot at 21.7)."""
    ptrs = tl.load(buffers_ptr + rank).to(tl.pointer_type(dtype)) + half + offsets
    if tl.constexpr(len(offsets.shape) == 1):
        ptrs = tl.multiple_of(ptrs, 16)
    else:
        ptrs = tl.multiple_of(ptrs, [1, 16])  # along rows: runs of 16 bytes start aligned
    return ptrs


@triton.jit
def _sum_ranks(buffers_ptr, half, offsets, mask, dtype, WORLD: tl.constexpr):
    """Every rank's staged values at `offsets`, summed in rank order in float32."""
    acc = tl.zeros(offsets.shape, dtype=tl.float32)
    for r in tl.static_range(WORLD):
        acc += tl.load(_staging(buffers_ptr, r, half, offsets, dtype), mask=mask, other=0.0,
                       cache_modifier=".cg").to(tl.float32)
    return acc


@triton.jit
def _one_shot_all_reduce_kernel(x_ptr, out_ptr, buffers_ptr, flags_ptr, epochs_ptr, timeout_ns, n, half_elems,
                                RANK: tl.constexpr, WORLD: tl.constexpr, PROGRAMS: tl.constexpr,
                                BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step: tl.constexpr = PROGRAMS * BLOCK
    offsets = tl.arange(0, BLOCK)
    dtype = x_ptr.dtype.element_ty
    epoch, half = _next_epoch(epochs_ptr, pid, half_elems)
    for start in range(pid * BLOCK, n, step):
        idx = start + offsets
        tl.store(_staging(buffers_ptr, RANK, half, idx, dtype), tl.load(x_ptr + idx, mask=idx < n), mask=idx < n)
    _exchange(flags_ptr, pid, epoch, timeout_ns, RANK, WORLD)
    for start in range(pid * BLOCK, n, step):
        idx = start + offsets
        tl.store(out_ptr + idx, _sum_ranks(buffers_ptr, half, idx, idx < n, dtype, WORLD).to(dtype), mask=idx < n)


@triton.jit
def _one_shot_add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, buffers_ptr, flags_ptr, epochs_ptr,
                                  timeout_ns, num_rows, half_elems, eps, D: tl.constexpr, BLOCK_D: tl.constexpr,
                                  ROWS: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
                                  PROGRAMS: tl.constexpr):
    """The all-reduce of x [rows, D] by whole rows, then `layernorm.add_rms_norm` of the sum and the
    residual, with its roundings (the sum rounded to the model dtype, the add in the model dtype)."""
    pid = tl.program_id(0)
    step: tl.constexpr = PROGRAMS * ROWS
    dtype = x_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    epoch, half = _next_epoch(epochs_ptr, pid, half_elems)
    for first in range(pid * ROWS, num_rows, step):
        rows = first + tl.arange(0, ROWS)
        mask = (rows < num_rows)[:, None] & (cols < D)[None, :]
        offsets = rows[:, None] * D + cols[None, :]
        tl.store(_staging(buffers_ptr, RANK, half, offsets, dtype), tl.load(x_ptr + offsets, mask=mask), mask=mask)
    _exchange(flags_ptr, pid, epoch, timeout_ns, RANK, WORLD)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    for first in range(pid * ROWS, num_rows, step):
        rows = first + tl.arange(0, ROWS)
        mask = (rows < num_rows)[:, None] & (cols < D)[None, :]
        offsets = rows[:, None] * D + cols[None, :]
        total = _sum_ranks(buffers_ptr, half, offsets, mask, dtype, WORLD).to(dtype)
        residual = tl.load(res_ptr + offsets, mask=mask, other=0.0)
        x = (total.to(tl.float32) + residual.to(tl.float32)).to(dtype)
        tl.store(res_out_ptr + offsets, x, mask=mask)
        xf = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)
        normed = (xf * inv_rms[:, None]).to(dtype).to(tl.float32)
        tl.store(out_ptr + offsets, (w[None, :] * normed).to(out_ptr.dtype.element_ty), mask=mask)


class OneShotAllReduce:
    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int = MAX_BYTES,
                 programs: int = PROGRAMS, block: int = BLOCK, wait_timeout_s: float = WAIT_TIMEOUT_S):
        import torch.distributed._symmetric_memory as symm_mem

        assert max_bytes % 16 == 0, "each staging half starts 16-byte aligned"
        self.max_bytes, self.programs, self.block = max_bytes, programs, block
        self.timeout_ns = int(wait_timeout_s * 1e9)
        self.rank, self.world = group.rank(), group.size()
        self.staging = symm_mem.empty(2 * max_bytes, dtype=torch.uint8, device=device)  # two halves
        self.flags = symm_mem.empty(programs * self.world, dtype=torch.int64, device=device)
        self.flags.zero_()
        # rendezvous is collective: every rank maps every other rank's allocation
        self.buffer_ptrs = _peer_pointers(symm_mem.rendezvous(self.staging, group.group_name), device)
        self.flag_ptrs = _peer_pointers(symm_mem.rendezvous(self.flags, group.group_name), device)
        self.epochs = torch.zeros(programs, dtype=torch.int64, device=device)
        torch.cuda.synchronize(device)
        dist.barrier(group)  # every rank's flags are zero before anyone can signal

    @classmethod
    def create(cls, group: dist.ProcessGroup, device: torch.device, **kwargs: int) -> "OneShotAllReduce | None":
        """None where symmetric memory cannot be set up (no peer access between the GPUs); the layers
        then use NCCL for every all-reduce. Collective: every rank calls it."""
        one_shot = None
        try:
            one_shot = cls(group, device, **kwargs)
        except (RuntimeError, ImportError) as e:
            log.warning("one-shot all-reduce unavailable (%s); all-reduces go through NCCL", e)
        # The ranks agree: one rank on NCCL and another on the buffers would wait for each other forever.
        ok = torch.tensor([one_shot is not None], dtype=torch.int32, device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
        return one_shot if ok.item() else None

    def fits(self, x: torch.Tensor) -> bool:
        return x.is_contiguous() and x.numel() * x.element_size() <= self.max_bytes

    def fits_rows(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """Whether `add_rms_norm` takes x and residual: rows whose bytes are a multiple of 16 (the
        kernel reads and writes the staged rows 16 bytes at a time)."""
        return (self.fits(x) and x.dim() == 2 and residual.is_contiguous() and residual.shape == x.shape
                and x.shape[1] * x.element_size() % 16 == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x, as a new tensor (x is left as it was)."""
        out = torch.empty_like(x)
        _one_shot_all_reduce_kernel[(self.programs,)](
            x, out, self.buffer_ptrs, self.flag_ptrs, self.epochs, self.timeout_ns, x.numel(),
            self.max_bytes // x.element_size(),
            RANK=self.rank, WORLD=self.world, PROGRAMS=self.programs, BLOCK=self.block, num_warps=8)
        return out

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`layernorm.add_rms_norm(sum of every rank's x, residual, weight, eps)` in the same kernel as
        the all-reduce, for x and residual [tokens, D] that `fits_rows`."""
        assert self.fits_rows(x, residual)
        out, new_residual = torch.empty_like(x), torch.empty_like(x)
        d = x.shape[1]
        block_d = triton.next_power_of_2(d)
        _one_shot_add_rms_norm_kernel[(self.programs,)](
            x, residual, weight, out, new_residual, self.buffer_ptrs, self.flag_ptrs, self.epochs, self.timeout_ns,
            x.shape[0],
            self.max_bytes // x.element_size(), eps, D=d, BLOCK_D=block_d, ROWS=max(1, self.block // block_d),
            RANK=self.rank, WORLD=self.world, PROGRAMS=self.programs, num_warps=8)
        return out, new_residual


def _peer_pointers(handle: object, device: torch.device) -> torch.Tensor:
    return torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
