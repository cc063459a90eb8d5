"""Simulated collectives: results, message schedule, byte counts; alpha-beta cost model."""

import numpy as np
import pytest

from mlc_course import collectives as C

NS = range(1, 9)
LENGTHS = (1, 7, 1000, 1001)


def make_bufs(n, length, dtype, seed=0):
    rng = np.random.default_rng(seed + 97 * n + length)
    if np.issubdtype(dtype, np.integer):
        return [rng.integers(-1000, 1000, size=length).astype(dtype) for _ in range(n)]
    return [rng.standard_normal(length).astype(dtype) for _ in range(n)]


def assert_sum(out, bufs):
    expected = np.sum(np.stack(bufs), axis=0)
    assert len(out) == len(bufs)
    for o in out:
        assert o.shape == bufs[0].shape and o.dtype == bufs[0].dtype
        if np.issubdtype(o.dtype, np.integer):
            np.testing.assert_array_equal(o, expected)
        else:
            np.testing.assert_allclose(o, expected, rtol=1e-5, atol=1e-5)
    # every rank holds bitwise the same result, floats included
    for o in out[1:]:
        assert o.tobytes() == out[0].tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
@pytest.mark.parametrize("n", NS)
def test_ring_allreduce_is_the_sum(n, dtype):
    for length in LENGTHS:
        bufs = make_bufs(n, length, dtype)
        before = [b.copy() for b in bufs]
        assert_sum(C.ring_allreduce(bufs), bufs)
        assert_sum(C.allreduce_naive(bufs), bufs)
        for b, b0 in zip(bufs, before):  # inputs untouched
            np.testing.assert_array_equal(b, b0)


def test_ring_allreduce_keeps_shape():
    bufs = [np.arange(24, dtype=np.int64).reshape(2, 3, 4) * (r + 1) for r in range(3)]
    assert_sum(C.ring_allreduce(bufs), bufs)


@pytest.mark.parametrize("n", NS)
def test_ring_steps_and_bytes(n):
    length = 840  # divisible by 1..8
    bufs = make_bufs(n, length, np.float32)
    nbytes = bufs[0].nbytes
    t = C.CommStats()
    C.ring_allreduce(bufs, trace=t)
    assert t.num_steps == 2 * (n - 1)
    assert t.phases == ["reduce-scatter"] * (n - 1) + ["all-gather"] * (n - 1)
    assert t.bytes_sent_per_rank == [2 * (n - 1) * nbytes // n] * n
    assert t.bytes_received_per_rank == t.bytes_sent_per_rank
    # every step is one message per rank, to its right neighbour
    for step in t.steps:
        assert sorted(s.src for s in step) == list(range(n))
        assert all(s.dst == (s.src + 1) % n for s in step)
    # the naive one: one step, (n-1) whole buffers per rank
    t1 = C.CommStats()
    C.allreduce_naive(bufs, trace=t1)
    assert t1.num_steps == (1 if n > 1 else 0)
    assert t1.bytes_sent_per_rank == [(n - 1) * nbytes] * n


@pytest.mark.parametrize("n", [3, 8])
@pytest.mark.parametrize("length", [1, 7, 1001])
def test_ring_uneven_lengths_still_move_one_buffer_per_step(n, length):
    """Chunks differ in size (or are empty) but every step moves each chunk exactly once."""
    bufs = make_bufs(n, length, np.int64)
    t = C.CommStats()
    C.ring_allreduce(bufs, trace=t)
    assert t.num_steps == 2 * (n - 1)
    for step in t.steps:
        assert sorted(s.chunk for s in step) == list(range(n))
        assert sum(s.nbytes for s in step) == bufs[0].nbytes
    assert t.total_bytes == 2 * (n - 1) * bufs[0].nbytes
    assert "reduce-scatter" in str(t)


@pytest.mark.parametrize("n", NS)
def test_reduce_scatter_then_all_gather_is_allreduce(n):
    for length in LENGTHS:
        bufs = make_bufs(n, length, np.int64)
        total = np.sum(np.stack(bufs), axis=0)
        for rs, ag in [(C.ring_reduce_scatter, C.ring_allgather), (C.reduce_scatter, C.all_gather)]:
            shards = rs(bufs)
            for r, (a, b) in enumerate(C.chunk_bounds(length, n)):
                np.testing.assert_array_equal(shards[r], total[a:b])
            for full in ag(shards):
                np.testing.assert_array_equal(full, total)
        fb = make_bufs(n, length, np.float32)
        assert_sum(C.all_gather(C.reduce_scatter(fb)), fb)
        assert_sum(C.ring_allgather(C.ring_reduce_scatter(fb)), fb)


def test_chunk_bounds():
    assert C.chunk_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert C.chunk_bounds(1, 3) == [(0, 1), (1, 1), (1, 1)]
    assert C.chunk_bounds(5, 1) == [(0, 5)]


@pytest.mark.parametrize("n", [1, 2, 5])
def test_broadcast_from_root(n):
    bufs = make_bufs(n, 11, np.float32)
    for root in range(n):
        t = C.CommStats()
        out = C.broadcast(bufs, root=root, trace=t)
        for o in out:
            assert o.tobytes() == bufs[root].tobytes()
        assert out[root] is not bufs[root]
        sent = t.bytes_sent_per_rank
        assert sent == [(n - 1) * bufs[0].nbytes if r == root else 0 for r in range(n)]
    with pytest.raises(ValueError):
        C.broadcast(bufs, root=n)


def test_mismatched_buffers_rejected():
    with pytest.raises(ValueError):
        C.ring_allreduce([np.zeros(3), np.zeros(4)])
    with pytest.raises(ValueError):
        C.ring_allreduce([np.zeros(3, np.float32), np.zeros(3, np.float64)])
    with pytest.raises(ValueError):
        C.ring_allreduce([])


# ---------------------------------------------------------------------- cost model

@pytest.mark.parametrize("link", list(C.LINKS.values()))
def test_cost_model_zero_for_one_rank_and_monotonic(link):
    sizes = [0, 16, 16384, 1 << 20, 64 << 20]
    for algo in C.ALGOS:
        assert C.allreduce_time(1 << 20, 1, link, algo) == 0.0
        for n in range(2, 17):
            times = [C.allreduce_time(b, n, link, algo) for b in sizes]
            assert all(t > 0 for t in times)
            assert times == sorted(times) and len(set(times)) == len(times)
        by_n = [C.allreduce_time(1 << 20, n, link, algo) for n in range(1, 17)]
        assert by_n == sorted(by_n)
    ring_by_n = [C.allreduce_time(16384, n, link) for n in range(1, 17)]
    assert all(a < b for a, b in zip(ring_by_n, ring_by_n[1:]))


def test_cost_model_formulas():
    link = C.Link("toy", alpha_s=1e-6, beta_Bps=1e9)
    assert C.allreduce_time(4000, 4, link) == pytest.approx(6e-6 + 1.5 * 4e-6)
    assert C.allreduce_time(4000, 4, link, "one_shot") == pytest.approx(1e-6 + 3 * 4e-6)
    assert C.allreduce_time(4000, 4, "nvlink-h100") == C.allreduce_time(4000, 4, C.NVLINK_H100)
    # the calibration: a small fp16 all-reduce on 2 H100s over NVLink takes 9-10 us
    assert 9e-6 <= C.allreduce_time(16384, 2, C.NVLINK_H100) <= 10e-6
    # bus bandwidth of a large ring all-reduce recovers beta
    t = C.allreduce_time(1 << 30, 8, link) - 14 * link.alpha_s
    assert C.bus_bandwidth(1 << 30, 8, t) == pytest.approx(link.beta_Bps)
    assert C.fastest_allreduce(64, 8, C.NVLINK_H100)[0] == "one_shot"
    assert C.fastest_allreduce(1 << 30, 8, C.NVLINK_H100)[0] in ("ring", "two_shot")
    with pytest.raises(ValueError):
        C.allreduce_time(10, 2, link, "butterfly")


def test_decode_allreduce_time_per_token():
    # Llama-2-70B: 80 layers, hidden 8192 -> 160 all-reduces of 16 KB per token
    t = C.decode_allreduce_time_per_token(8192, 80, 2, C.NVLINK_H100)
    assert t == pytest.approx(160 * C.allreduce_time(8192 * 2, 2, C.NVLINK_H100))
    assert C.decode_allreduce_time_per_token(8192, 80, 1, C.PCIE4_X16) == 0.0
    per_n = [C.decode_allreduce_time_per_token(8192, 80, n, C.PCIE4_X16) for n in range(1, 9)]
    assert per_n == sorted(per_n)
    assert (C.decode_allreduce_time_per_token(8192, 80, 4, C.PCIE4_X16, batch_size=8)
            > C.decode_allreduce_time_per_token(8192, 80, 4, C.PCIE4_X16))
