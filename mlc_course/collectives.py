"""Collectives on simulated ranks, and an alpha-beta model of what they cost.

Tensor parallelism splits every weight matrix over N devices. Each device then holds only a
*partial* result of a row-parallel matmul, and the devices must add their partials together:
that is an **all-reduce**, and a Llama layer needs two of them per token (after the attention
output projection and after the MLP down projection). This module shows how that addition is
done without any device ever seeing the whole picture, and how long it takes.

Data model
----------
A "cluster" is just a Python list with one NumPy array per rank: ``bufs[r]`` is the buffer
that rank ``r`` holds. All buffers of a collective have the same shape and dtype, like the
device buffers handed to NCCL. Every function returns *new* arrays and leaves its inputs
untouched, so a notebook can call them again and compare.

The ring algorithms below are simulated honestly: rank ``r`` only ever reads its own working
copy and the chunks that were *sent* to it (copied out of the sender's buffer through
``_send``). Nothing sums the buffers globally, so the code is the algorithm, not an imitation
of its result. All ranks send at the same time in one step: each step first takes every
message out of the senders' buffers, then delivers them.

Pass a :class:`CommStats` as ``trace=`` to record every message: the list of steps, each a
list of ``Send(src, dst, chunk, nbytes)``. From it come the two numbers that decide the cost,
the number of steps (each pays a latency, alpha) and the bytes each rank sends (each byte pays
1/beta). :func:`allreduce_time` turns those into seconds.

Floating point
--------------
Addition of floats is not associative: summing the same numbers in another order can change the
last bits. The ring adds chunk ``c`` in the order ranks ``c+1, c+2, ..., c`` (mod N), so its
result can differ from ``np.sum`` by a few ulps; compare floats with a tolerance and integers
exactly. What matters more for inference is that **every rank ends with bitwise the same
result**: all the algorithms here reduce each element once, on one rank, and copy the result
to the others, so greedy decoding cannot diverge between ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

__all__ = [
    "Send", "CommStats", "chunk_bounds",
    "allreduce_naive", "ring_reduce_scatter", "ring_allgather", "ring_allreduce",
    "reduce_scatter", "all_gather", "broadcast",
    "Link", "NVLINK_H100", "PCIE4_X16", "CPU_SHM", "LINKS", "ALGOS",
    "allreduce_time", "fastest_allreduce", "bus_bandwidth", "decode_allreduce_time_per_token",
]


# =============================================================================================
# Tracing: what was sent, when
# =============================================================================================

class Send(NamedTuple):
    """One message: rank ``src`` sends chunk number ``chunk`` (``nbytes`` bytes) to ``dst``.

    ``chunk`` is the index of the chunk in the sender's buffer (see :func:`chunk_bounds`), or
    -1 when a whole buffer is sent.
    """

    src: int
    dst: int
    chunk: int
    nbytes: int


@dataclass
class CommStats:
    """A record of the messages of one or more collectives on ``n`` ranks.

    ``steps[i]`` is the list of :class:`Send` that happen at the same time in step ``i``, and
    ``phases[i]`` names the collective (phase) that step belongs to. The cost of a collective
    is about ``num_steps * alpha + max(bytes_sent_per_rank) / beta``: each step waits for its
    slowest message, and a rank's link carries its bytes one after the other.
    """

    n: int | None = None
    steps: list[list[Send]] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)

    def _start(self, n: int) -> None:
        if self.n is None:
            self.n = n
        elif self.n != n:
            raise ValueError(f"this trace is for {self.n} ranks, not {n}")

    def record(self, phase: str, sends: list[Send]) -> None:
        """Append one step (all of its messages happen at once)."""
        self.steps.append(list(sends))
        self.phases.append(phase)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def bytes_sent_per_rank(self) -> list[int]:
        """Bytes each rank sent, summed over all steps (index = rank)."""
        out = [0] * (self.n or 0)
        for step in self.steps:
            for s in step:
                out[s.src] += s.nbytes
        return out

    @property
    def bytes_received_per_rank(self) -> list[int]:
        out = [0] * (self.n or 0)
        for step in self.steps:
            for s in step:
                out[s.dst] += s.nbytes
        return out

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for step in self.steps for s in step)

    def format(self, max_steps: int = 32) -> str:
        """A readable table: one line per step, ``src→dst cK (bytes)`` per message."""
        sent = self.bytes_sent_per_rank
        lines = [f"{self.n} ranks, {self.num_steps} steps, {self.total_bytes} B in total, "
                 f"bytes sent per rank: {sent}"]
        for i, (phase, step) in enumerate(zip(self.phases, self.steps)):
            if i == max_steps:
                lines.append(f"... {self.num_steps - max_steps} more steps")
                break
            msgs = "  ".join(f"{s.src}→{s.dst} " + (f"c{s.chunk}" if s.chunk >= 0 else "all")
                             + f" ({s.nbytes} B)" for s in step)
            lines.append(f"step {i + 1:>2} {phase:<14} {msgs}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# =============================================================================================
# Helpers
# =============================================================================================

def chunk_bounds(length: int, n: int) -> list[tuple[int, int]]:
    """Cut ``length`` elements into ``n`` contiguous chunks, as ``[(start, stop), ...]``.

    The first ``length % n`` chunks get one element more, like ``np.array_split``; when
    ``length < n`` the last chunks are empty. Every algorithm and every rank uses this same
    cut, so that "chunk c" means the same elements everywhere.
    """
    if n < 1:
        raise ValueError(f"need at least one chunk, got {n}")
    base, extra = divmod(length, n)
    bounds, start = [], 0
    for c in range(n):
        stop = start + base + (1 if c < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _check(bufs: Sequence[np.ndarray]) -> int:
    """All ranks must hold buffers of the same shape and dtype; return the number of ranks."""
    if len(bufs) == 0:
        raise ValueError("a collective needs at least one rank")
    shape, dtype = np.shape(bufs[0]), np.asarray(bufs[0]).dtype
    for r, b in enumerate(bufs):
        if np.shape(b) != shape or np.asarray(b).dtype != dtype:
            raise ValueError(f"rank {r} holds {np.asarray(b).dtype}{list(np.shape(b))}, "
                             f"rank 0 holds {dtype}{list(shape)}")
    return len(bufs)


def _send(src: int, dst: int, chunk: int, data: np.ndarray) -> tuple[Send, np.ndarray]:
    """The wire: the receiver gets a *copy* of the data, never a view of the sender's memory."""
    return Send(src, dst, chunk, int(data.nbytes)), np.array(data, copy=True)


def _sum_in_rank_order(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Sum ``parts[0] + parts[1] + ...`` left to right: a fixed order gives the same bits on
    every rank that runs it."""
    acc = np.array(parts[0], copy=True)
    for p in parts[1:]:
        acc += p
    return acc


# =============================================================================================
# Direct (all-to-all) algorithms: one step, a lot of bytes
# =============================================================================================

def allreduce_naive(bufs: Sequence[np.ndarray], trace: CommStats | None = None
                    ) -> list[np.ndarray]:
    """All-reduce by brute force: every rank sends its *whole* buffer to every other rank.

    One step, so only one latency, but each rank sends ``(N-1) * nbytes``, N/2 times what a
    ring sends. Each rank then adds the N buffers in rank order 0, 1, ..., N-1 (not "mine
    first"), so all ranks get bitwise the same sum. This is the "one-shot" all-reduce that
    custom kernels use for tiny messages over NVSwitch, where latency is all that counts.
    """
    n = _check(bufs)
    if trace is not None:
        trace._start(n)
    flats = [np.asarray(b).ravel() for b in bufs]
    inbox: list[dict[int, np.ndarray]] = [{r: flats[r].copy()} for r in range(n)]
    sends = []
    for src in range(n):
        for dst in range(n):
            if dst != src:
                msg, data = _send(src, dst, -1, flats[src])
                sends.append(msg)
                inbox[dst][src] = data
    if trace is not None and n > 1:
        trace.record("one-shot", sends)
    shape = np.shape(bufs[0])
    return [_sum_in_rank_order([inbox[r][s] for s in range(n)]).reshape(shape)
            for r in range(n)]


def reduce_scatter(bufs: Sequence[np.ndarray], trace: CommStats | None = None
                   ) -> list[np.ndarray]:
    """Reduce-scatter: rank ``r`` gets chunk ``r`` of the elementwise sum of all buffers.

    Semantics (shared with :func:`ring_reduce_scatter`): each buffer is flattened and cut by
    :func:`chunk_bounds` into N chunks; the result is a list of N 1-D arrays, ``out[r] =
    sum_over_ranks(buf.ravel())[start_r:stop_r]``.

    Algorithm here: in one step every rank sends chunk ``c`` straight to rank ``c``, which adds
    the N pieces in rank order. Each rank sends ``(N-1)/N * nbytes``, the minimum possible,
    in a single step, but needs a link to every other rank at once (an NVSwitch crossbar).
    """
    n = _check(bufs)
    if trace is not None:
        trace._start(n)
    flats = [np.asarray(b).ravel() for b in bufs]
    bounds = chunk_bounds(flats[0].size, n)
    inbox: list[dict[int, np.ndarray]] = [{} for _ in range(n)]
    sends = []
    for src in range(n):
        for c, (a, b) in enumerate(bounds):
            if c == src:
                inbox[c][src] = flats[src][a:b].copy()
            else:
                msg, inbox[c][src] = _send(src, c, c, flats[src][a:b])
                sends.append(msg)
    if trace is not None and n > 1:
        trace.record("reduce-scatter", sends)
    return [_sum_in_rank_order([inbox[r][s] for s in range(n)]) for r in range(n)]


def all_gather(shards: Sequence[np.ndarray], trace: CommStats | None = None
               ) -> list[np.ndarray]:
    """All-gather: every rank gets the concatenation of all ranks' shards, in rank order.

    Semantics (shared with :func:`ring_allgather`): ``shards[r]`` is a 1-D array (shards may
    differ in length by one element, as :func:`chunk_bounds` cuts them); every rank gets
    ``np.concatenate(shards)``. So ``all_gather(reduce_scatter(bufs))`` is an all-reduce of the
    flattened buffers: the "two-shot" all-reduce.

    Algorithm here: in one step each rank sends its shard directly to every other rank.
    """
    n = len(shards)
    if n == 0:
        raise ValueError("a collective needs at least one rank")
    if trace is not None:
        trace._start(n)
    flats = [np.asarray(s).ravel() for s in shards]
    inbox: list[dict[int, np.ndarray]] = [{r: flats[r].copy()} for r in range(n)]
    sends = []
    for src in range(n):
        for dst in range(n):
            if dst != src:
                msg, inbox[dst][src] = _send(src, dst, src, flats[src])
                sends.append(msg)
    if trace is not None and n > 1:
        trace.record("all-gather", sends)
    return [np.concatenate([inbox[r][s] for s in range(n)]) for r in range(n)]


def broadcast(bufs: Sequence[np.ndarray], root: int = 0, trace: CommStats | None = None
              ) -> list[np.ndarray]:
    """Broadcast: every rank gets a copy of rank ``root``'s buffer.

    The other ranks' buffers are only receive space (their contents are ignored), as in NCCL.
    Algorithm here: the root sends to each rank directly, N-1 messages in one step (the root's
    link carries ``(N-1) * nbytes``; NCCL pipelines chunks along a ring instead). This is how
    the engine hands out token ids or replicated weights from worker 0.
    """
    n = _check(bufs)
    if not 0 <= root < n:
        raise ValueError(f"root {root} is not a rank of {n}")
    if trace is not None:
        trace._start(n)
    out: list[np.ndarray | None] = [None] * n
    out[root] = np.array(bufs[root], copy=True)
    sends = []
    for dst in range(n):
        if dst != root:
            msg, out[dst] = _send(root, dst, -1, np.asarray(bufs[root]))
            sends.append(msg)
    if trace is not None and n > 1:
        trace.record("broadcast", sends)
    return out  # type: ignore[return-value]


# =============================================================================================
# Ring algorithms: 2(N-1) steps, each rank only talks to its right neighbour
# =============================================================================================

def ring_reduce_scatter(bufs: Sequence[np.ndarray], trace: CommStats | None = None
                        ) -> list[np.ndarray]:
    """Reduce-scatter around a ring: same result as :func:`reduce_scatter`, in N-1 steps.

    Each rank cuts its buffer into N chunks. At step ``s`` (0..N-2) rank ``r`` sends chunk
    ``(r - s - 1) % N`` to rank ``(r + 1) % N``, which adds it to its own copy of that chunk
    and forwards the partial sum at the next step. Chunk ``c`` starts at rank ``c+1``, picks up
    one rank's contribution per hop, and after N-1 hops arrives complete at rank ``c``.

    Every rank sends one chunk per step, ``(N-1)/N * nbytes`` in all, and only ever to the
    same neighbour: no link carries more than one message at a time, which is why the ring
    reaches full bandwidth on any topology that contains a ring (PCIe, NVLink, Ethernet).
    """
    n = _check(bufs)
    if trace is not None:
        trace._start(n)
    flats = [np.asarray(b).ravel() for b in bufs]
    bounds = chunk_bounds(flats[0].size, n)
    # chunks[r][c]: rank r's working copy of chunk c. Rank r only touches chunks[r].
    chunks = [[flat[a:b].copy() for a, b in bounds] for flat in flats]
    for s in range(n - 1):
        # 1. everyone sends at once: take all messages out before anyone adds
        messages = []
        for r in range(n):
            c = (r - s - 1) % n
            messages.append(_send(r, (r + 1) % n, c, chunks[r][c]))
        # 2. everyone adds what it received to its own copy of that chunk
        for msg, data in messages:
            chunks[msg.dst][msg.chunk] = chunks[msg.dst][msg.chunk] + data
        if trace is not None:
            trace.record("reduce-scatter", [msg for msg, _ in messages])
    return [chunks[r][r] for r in range(n)]


def ring_allgather(shards: Sequence[np.ndarray], trace: CommStats | None = None
                   ) -> list[np.ndarray]:
    """All-gather around a ring: same result as :func:`all_gather`, in N-1 steps.

    Rank ``r`` starts with chunk ``r``. At step ``s`` it sends chunk ``(r - s) % N`` (its own
    first, then the one it just received) to rank ``(r + 1) % N``, which stores it. After N-1
    steps every chunk has gone around the ring to every rank.
    """
    n = len(shards)
    if n == 0:
        raise ValueError("a collective needs at least one rank")
    if trace is not None:
        trace._start(n)
    # have[r][c]: rank r's copy of chunk c, None until it arrives
    have: list[list[np.ndarray | None]] = [[None] * n for _ in range(n)]
    for r in range(n):
        have[r][r] = np.asarray(shards[r]).ravel().copy()
    for s in range(n - 1):
        messages = []
        for r in range(n):
            c = (r - s) % n
            assert have[r][c] is not None, "the ring schedule sends only chunks a rank has"
            messages.append(_send(r, (r + 1) % n, c, have[r][c]))
        for msg, data in messages:
            have[msg.dst][msg.chunk] = data
        if trace is not None:
            trace.record("all-gather", [msg for msg, _ in messages])
    return [np.concatenate(have[r]) for r in range(n)]  # type: ignore[arg-type]


def ring_allreduce(bufs: Sequence[np.ndarray], trace: CommStats | None = None
                   ) -> list[np.ndarray]:
    """All-reduce around a ring = ring reduce-scatter, then ring all-gather.

    2(N-1) steps; each rank sends ``2(N-1)/N * nbytes`` in all, which tends to 2x the buffer
    however many ranks there are. That bandwidth-optimality is why NCCL uses it for large
    messages; its 2(N-1) latencies are why it loses for the small (hidden_size) all-reduces of
    single-batch decoding. Returns one array per rank, shaped like the input.
    """
    _check(bufs)
    shape = np.shape(bufs[0])
    owned = ring_reduce_scatter(bufs, trace)
    return [full.reshape(shape) for full in ring_allgather(owned, trace)]


# =============================================================================================
# Alpha-beta cost model
# =============================================================================================

@dataclass(frozen=True)
class Link:
    """The interconnect between devices, reduced to two numbers.

    Sending ``m`` bytes in one step costs ``alpha_s + m / beta_Bps``. ``alpha_s`` is the fixed
    cost of one step of a collective (kernel launch share, synchronisation with the peer,
    protocol overhead); ``beta_Bps`` is the bandwidth one rank sustains, in bytes/s, i.e. the
    "bus bandwidth" that nccl-tests reports for large messages.
    """

    name: str
    alpha_s: float
    beta_Bps: float
    note: str = ""


NVLINK_H100 = Link(
    "nvlink-h100", alpha_s=4.75e-6, beta_Bps=270e9,
    note="Measured on the lent 2x H100 (NCCL 2.28, design.md): a 4-32 KB fp16 all-reduce "
         "takes 9-10 us inside a CUDA graph (24-35 us launched eagerly), and a 64 MiB one "
         "runs at 270 GB/s bus bandwidth. A 2-rank ring all-reduce has 2 steps, so "
         "alpha = 9.5 us / 2. NVLink 4 peaks at 450 GB/s per direction.")
PCIE4_X16 = Link(
    "pcie4-x16", alpha_s=7.5e-6, beta_Bps=25e9,
    note="Estimate, not measured here: PCIe 4.0 x16 signals 31.5 GB/s per direction and "
         "delivers ~25 GB/s after protocol overhead; small all-reduces over PCIe take "
         "~10-20 us, so alpha = 7.5 us per step (15 us for 2 ranks). The seed's machines "
         "(A100-PCIe, A10G, RTX 4090, 7900 XTX) all talk over PCIe; consumer cards without "
         "peer-to-peer go through host memory and do worse.")
CPU_SHM = Link(
    "cpu-shm", alpha_s=2e-6, beta_Bps=10e9,
    note="Order of magnitude for worker processes on one CPU that exchange data through "
         "shared memory: a step is a flag write plus a spin-wait on another core (~1-2 us), "
         "and a copy streams at a few to ~10 GB/s per core. Measure the course's own "
         "shared-memory CCL (notebook 05) before trusting it.")

LINKS: dict[str, Link] = {link.name: link for link in (NVLINK_H100, PCIE4_X16, CPU_SHM)}

ALGOS = ("ring", "one_shot", "two_shot", "tree")


def allreduce_time(nbytes: float, n: int, link: Link | str, algo: str = "ring") -> float:
    """Seconds for an all-reduce of ``nbytes`` (per rank) over ``n`` ranks, alpha-beta model.

    - ``ring``:     2(n-1)·a + 2(n-1)/n · B/b. :func:`ring_allreduce`; NCCL's choice for large
      messages: least bytes, most steps.
    - ``one_shot``: a + (n-1) · B/b. :func:`allreduce_naive`; every rank pulls every other
      buffer at once. Best for tiny messages over a crossbar (NVSwitch, custom kernels).
    - ``two_shot``: 2·a + 2(n-1)/n · B/b. ``all_gather(reduce_scatter(x))`` with direct sends:
      ring bandwidth in two steps, if every pair of ranks has its own link (a crossbar).
    - ``tree``:     2·ceil(log2 n) · (a + B/b). Reduce up a binary tree, broadcast down, the
      whole buffer at each level (NCCL pipelines chunks through two trees to do better; not
      modelled).

    (a = ``link.alpha_s``, b = ``link.beta_Bps``.) One rank needs no communication: ``n = 1``
    costs 0 for every algorithm. The model ignores the time to add the numbers (tiny next to the
    transfer) and contention between links.

    Calibration caveat: the presets' alpha is one *step*, fitted to a 2-rank measurement (2
    steps). NCCL's small-message all-reduce does not pay 2(n-1) full steps at larger n (it
    switches to low-latency protocols and trees), so ``ring`` overstates small-message time as
    n grows (NVLink, n=8, 16 KB: ~67 us). Fit alpha to measurements at the n being modelled
    before comparing with real tok/s.
    """
    link = LINKS[link] if isinstance(link, str) else link
    if n < 1:
        raise ValueError(f"need at least one rank, got {n}")
    if nbytes < 0:
        raise ValueError(f"negative message size {nbytes}")
    if n == 1:
        return 0.0
    a, t_byte = link.alpha_s, nbytes / link.beta_Bps
    if algo == "ring":
        return 2 * (n - 1) * a + 2 * (n - 1) / n * t_byte
    if algo == "one_shot":
        return a + (n - 1) * t_byte
    if algo == "two_shot":
        return 2 * a + 2 * (n - 1) / n * t_byte
    if algo == "tree":
        return 2 * math.ceil(math.log2(n)) * (a + t_byte)
    raise ValueError(f"unknown algorithm {algo!r}; choose from {ALGOS}")


def fastest_allreduce(nbytes: float, n: int, link: Link | str,
                      algos: Sequence[str] = ALGOS) -> tuple[str, float]:
    """The algorithm the model says is fastest for this size, and its time. Like NCCL's and
    vLLM's tuners: one-shot for tiny messages, ring for large ones."""
    return min(((a, allreduce_time(nbytes, n, link, a)) for a in algos), key=lambda p: p[1])


def bus_bandwidth(nbytes: float, n: int, seconds: float) -> float:
    """nccl-tests' "bus bandwidth" of a measured all-reduce: ``nbytes / seconds * 2(n-1)/n``.

    It scales the plain rate by the bytes a ring actually moves per rank, so it is comparable
    across n and, for large messages, equals the ``beta_Bps`` of this model.
    """
    if n < 2:
        return 0.0
    return nbytes / seconds * 2 * (n - 1) / n


def decode_allreduce_time_per_token(hidden_size: int, num_layers: int, n: int,
                                    link: Link | str, dtype_bytes: int = 2,
                                    algo: str = "ring", batch_size: int = 1) -> float:
    """Seconds of all-reduce per decoded token in a Megatron-style tensor-parallel Llama.

    Each layer ends its attention (o_proj) and its MLP (down_proj) with a row-parallel matmul,
    whose partial outputs, ``batch_size * hidden_size`` activations, are summed over the n
    ranks: 2 all-reduces per layer per token. For Llama-2-70B (8192, 80 layers) in fp16 that
    is 160 all-reduces of 16 KB, small enough that the latency term dominates.
    """
    nbytes = batch_size * hidden_size * dtype_bytes
    return 2 * num_layers * allreduce_time(nbytes, n, link, algo)
