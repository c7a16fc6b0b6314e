"""The emulated link (parallel/comm.py) and the CP attention cost model (parallel/cost_model.py)."""

from __future__ import annotations

import time

import pytest
import torch

import magitrain.parallel.comm as comm
from magitrain.parallel.attention import CPAttnPlan
from magitrain.parallel.cost_model import H100_IB, Hardware, RankWork, fit_compute, predict, simulate
from magitrain.parallel.dispatch import solve
from magitrain.parallel.mask import packed_videos


def test_link_is_a_fifo_of_bandwidth_plus_latency():
    link = comm.EmulatedLink(bandwidth=1000.0, latency=0.01)
    t0 = time.perf_counter()
    first = link.schedule(100)  # holds the link 0.1 s
    second = link.schedule(50)  # queued behind it: starts when the first is through
    assert first - t0 == pytest.approx(0.11, abs=5e-3)
    assert second - t0 == pytest.approx(0.16, abs=5e-3)
    assert link.busy_s == pytest.approx(0.17) and link.transfers == 2
    with pytest.raises(ValueError):
        comm.EmulatedLink(0.0)


def test_pending_sleeps_only_the_remainder():
    t0 = time.perf_counter()
    comm.Pending(None, torch.zeros(1), done_at=t0 + 0.08).wait()
    assert time.perf_counter() - t0 >= 0.08
    t1 = time.perf_counter()
    comm.Pending(None, torch.zeros(1), done_at=t1 - 1.0).wait()  # compute already covered it
    assert time.perf_counter() - t1 < 0.05


MASK = packed_videos([[64] * 4, [64] * 2])


def test_group_cast_books_the_bytes_it_moves(monkeypatch):
    plan = solve(MASK, 2, 32)
    cp = comm.CommPlan.build(plan, MASK, 1, num_stages=2)

    class Work:
        def wait(self):
            pass

    monkeypatch.setattr(comm.dist, "all_to_all_single", lambda *a, **k: Work())
    x = torch.zeros(plan.local_seqlen, 3)
    with comm.emulate_link(bandwidth=1e9, latency=0.0) as link:
        for s in range(2):
            cp.group_cast(s, x, None).wait()
    rows = [max(st.num_send, st.num_recv) for st in cp.stages if st.active]
    assert link.transfers == len(rows)
    assert link.busy_s == pytest.approx(sum(rows) * 3 * 4 / 1e9)
    assert comm._LINK is None  # off again outside the block


def _work(stages):
    plan = solve(MASK, 2, 32)
    return RankWork.of(CPAttnPlan(plan, MASK, 0, stages), "area")


def test_simulate_limits():
    rw = _work(2)
    hw = Hardware(attn_flops=1e9, bandwidth=1e6, latency=1e-4)
    fast_link = simulate(rw, 4, 2, 32, 4, Hardware(1e9, 1e18, 0.0))
    assert fast_link["total"] == pytest.approx(fast_link["compute"])  # nothing to wait for
    no_compute = simulate(rw, 4, 2, 32, 4, Hardware(1e30, 1e6, 0.0))
    assert no_compute["total"] == pytest.approx(no_compute["comm"], rel=1e-6)  # transfers back to back
    queued = simulate(rw, 4, 2, 32, 4, Hardware(1e30, 1e6, 1e-4))  # a queued transfer's latency overlaps
    assert queued["comm"] - 6 * 1e-4 <= queued["total"] < queued["comm"]
    both = simulate(rw, 4, 2, 32, 4, hw)
    assert max(both["compute"], both["comm"]) <= both["total"] <= both["compute"] + both["comm"] + 1e-12


def test_staging_hides_comm_when_comm_is_comparable():
    """comm = half the compute: two stages hide part of what one stage exposes (the backward's
    dK/dV reduces then share the link with the next fetch, so more stages are not always better)."""
    hw = Hardware(attn_flops=1e9, bandwidth=4e6, latency=0.0)
    one, two = (simulate(_work(s), 4, 2, 32, 4, hw) for s in (1, 2))
    assert two["total"] < one["total"]
    for r in (one, two):
        assert r["total"] >= max(r["compute"], r["comm"])


def test_fit_recovers_the_compute_figures():
    hw = Hardware(attn_flops=3e9, bandwidth=1e6, bwd_factor=2.0)
    samples = []
    for s in (1, 2, 3):
        rw = _work(s)
        fwd = 4.0 * sum(rw.work) * 32 * 4 / 3e9
        samples.append((rw, fwd, 3 * fwd))
    fitted = fit_compute(samples, 4, 32, Hardware(1.0, 1e6))
    assert fitted.attn_flops == pytest.approx(3e9) and fitted.bwd_factor == pytest.approx(2.0)


def test_h100_prediction_per_rank():
    out = predict(solve(MASK, 2, 32), MASK, 2, 16, 8, 128, H100_IB)
    assert len(out) == 2 and all(r["total"] > 0 for r in out)


def test_thread_cpu_clock_adds_the_wait_instead_of_sleeping():
    link = comm.EmulatedLink(bandwidth=1.0, latency=0.0, clock="thread_cpu")
    t0 = link.now()
    done = link.schedule(5)  # 5 s on this clock
    w0 = time.perf_counter()
    comm.Pending(None, torch.zeros(1), done_at=done, link=link).wait()
    assert time.perf_counter() - w0 < 0.5  # no real sleep
    assert link.now() - t0 >= 5.0
