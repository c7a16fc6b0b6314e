"""Context-parallel slice attention against a single-process dense-mask fp64 reference.

Single-process tests check the slice-cutting algebra, the comm plan's bookkeeping and the
partial backward. One spawn of 4 gloo processes then runs every distributed case on
subgroups of 1, 2 and 4 ranks: outputs and dQ/dK/dV in float64 must match the dense
reference to 1e-10 (fp64 rounding only; a wrong mask piece, lost stage or misrouted gradient
is O(1e-2) or larger).
"""

from __future__ import annotations

import os
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from magitrain.parallel import dispatch as dispatch_mod
from magitrain.parallel.attention import (CPAttnPlan, CPSliceAttention, cut_slice, dispatch, local_positions,
                                          restrict_slices, undispatch)
from magitrain.parallel.comm import CommPlan
from magitrain.parallel.dispatch import remote_kv_ranges, solve
from magitrain.parallel.kernels import (merge_partials, partial_attention_backward, pick_backend,
                                        slice_attention)
from magitrain.parallel.mask import (AttnRange, AttnSlice, AttnSlices, MaskType, block_causal_video,
                                     packed_videos, sliding_window_causal, varlen_causal)

TOL = 1e-10  # fp64 end to end


# ----------------------------------------------------------------------------------------
# references and mask generators
# ----------------------------------------------------------------------------------------


def dense_reference(q, k, v, slices: AttnSlices, scale=None):
    """Plain softmax attention with the dense boolean mask; rows seeing nothing give 0."""
    hq, d = q.shape[1], q.shape[2]
    scale = d ** -0.5 if scale is None else scale
    rep = hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    mask = slices.to_dense(device=q.device)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, v)


def random_slices(n: int, rng: random.Random) -> AttnSlices:
    """Non-overlapping random slices of all four types: per q block, disjoint k ranges."""
    slices, q0 = [], 0
    while q0 < n:
        q1 = min(n, q0 + rng.randint(3, 20))
        k0 = 0
        while k0 < n:
            k1 = min(n, k0 + rng.randint(2, 25))
            if rng.random() < 0.6:
                slices.append(AttnSlice(AttnRange(q0, q1), AttnRange(k0, k1), rng.choice(list(MaskType))))
            k0 = k1
        q0 = q1
    return AttnSlices(slices, n)


def mask_cases():
    rng = random.Random(7)
    return {
        "magi_videos": packed_videos([[12, 12, 12], [10, 10], [9]]),
        "causal": varlen_causal([61]),
        "varlen_causal": varlen_causal([20, 33, 14]),
        "sliding_window": sliding_window_causal(70, 16),
        "odd_video": block_causal_video([13, 13, 13, 13, 5]),
        "random": random_slices(83, rng),
    }


def solvers():
    """Contiguous, MagiAttention's greedy (scatters chunks: most traffic) and our default."""
    return [name for name in ("contiguous", "area_greedy", "default")
            if name in dispatch_mod.SOLVERS or name in getattr(dispatch_mod, "ALIASES", {})]


# ----------------------------------------------------------------------------------------
# single-process: the cut algebra, the comm plan, the partial backward
# ----------------------------------------------------------------------------------------


def test_cut_slice_matches_dense():
    rng = random.Random(0)
    n = 25
    for _ in range(2000):
        qs, lq, ks, lk = rng.randint(0, 10), rng.randint(1, 12), rng.randint(0, 10), rng.randint(1, 12)
        s = AttnSlice(AttnRange(qs, qs + lq), AttnRange(ks, ks + lk), rng.choice(list(MaskType)))
        a, c = rng.randint(0, n), rng.randint(0, n)
        b, d = rng.randint(a, n), rng.randint(c, n)
        want = AttnSlices([s], n).to_dense()
        rect = torch.zeros(n, n, dtype=torch.bool)
        rect[a:b, c:d] = True
        pieces = cut_slice(s, AttnRange(a, b), AttnRange(c, d))
        assert len(pieces) <= 3
        got = sum((AttnSlices([p], n).to_dense().int() for p in pieces), torch.zeros(n, n, dtype=torch.int))
        assert torch.equal(got, (want & rect).int()), (s, (a, b, c, d), pieces)  # exact, no pair twice
        for p in pieces:
            lo, hi = p.row_bounds()
            assert bool((hi > lo).all()), f"{p} has a row that sees no key"


def test_cut_slice_causal_trapezoid_example():
    # square causal over [0, 8); rows [4, 8) x keys [2, 6): rows 4, 5 stop at the diagonal
    # (a trapezoid, bottom-right aligned), rows 6, 7 see the whole key range
    s = AttnSlice(AttnRange(0, 8), AttnRange(0, 8), MaskType.CAUSAL)
    assert cut_slice(s, AttnRange(4, 8), AttnRange(2, 6)) == [
        AttnSlice(AttnRange(4, 6), AttnRange(2, 6), MaskType.CAUSAL),
        AttnSlice(AttnRange(6, 8), AttnRange(2, 6), MaskType.FULL),
    ]
    # above the diagonal: nothing
    assert cut_slice(s, AttnRange(0, 3), AttnRange(5, 8)) == []


def test_restrict_slices_matches_dense():
    rng = random.Random(1)
    for name, slices in mask_cases().items():
        n = slices.total_q
        for _ in range(5):
            # random layouts: chunks of the sequence in a random order, some left out
            bounds = sorted(rng.sample(range(1, n), 6))
            chunks = [AttnRange(a, b) for a, b in zip([0] + bounds, bounds + [n])]
            rng.shuffle(chunks)
            q_chunks, kv_chunks = chunks[:4], chunks[2:]
            q_layout = _layout(q_chunks)
            kv_layout = _layout(kv_chunks)
            nq, nk = sum(c.size for c in q_chunks), sum(c.size for c in kv_chunks)
            local = restrict_slices(slices, q_layout, kv_layout, nq, nk)
            q_pos = torch.cat([torch.arange(c.start, c.end) for c in q_chunks])
            k_pos = torch.cat([torch.arange(c.start, c.end) for c in kv_chunks])
            want = slices.to_dense()[q_pos][:, k_pos]
            counts = sum((AttnSlices([s], nq, nk).to_dense().int() for s in local),
                         torch.zeros(nq, nk, dtype=torch.int))
            assert torch.equal(counts, want.int()), name


def _layout(chunks):
    out, off = [], 0
    for c in chunks:
        out.append((c, off))
        off += c.size
    return tuple(out)


@pytest.mark.parametrize("cp,stages", [(2, 1), (4, 3)])
def test_comm_plan_bookkeeping(cp, stages):
    for name, slices in mask_cases().items():
        for solver in solvers():
            plan = solve(slices, cp, 8, solver)
            comms = [CommPlan.build(plan, slices, r, stages) for r in range(cp)]
            for r, cm in enumerate(comms):
                received = sorted(g for st in cm.stages for g, _ in st.recv_ranges)
                covered = dispatch_mod.merge_ranges(received)
                assert covered == remote_kv_ranges(plan, slices, r), (name, solver, r)
                assert sum(g.size for g in received) == sum(g.size for g in covered)  # nothing twice
                sizes = [st.num_recv for st in cm.stages]
                assert max(sizes) - min(sizes) <= 1, sizes  # equal token counts per stage
                for s, st in enumerate(cm.stages):
                    for p in range(cp):  # what p sends r is what r expects from p
                        assert comms[p].stages[s].send_splits[r] == st.recv_splits[p]
                    assert st.active == any(c.stages[s].num_recv for c in comms)
                    owner_rows = cm.stages[s].send_idx
                    assert owner_rows.numel() == st.num_send and bool((owner_rows >= 0).all())


def test_comm_plan_rejects_bad_input():
    slices = varlen_causal([30])
    plan = solve(slices, 2, 8)
    with pytest.raises(ValueError, match="rank"):
        CommPlan.build(plan, slices, 2)
    with pytest.raises(ValueError, match="stages"):
        CommPlan.build(plan, slices, 0, 0)
    with pytest.raises(ValueError, match="tokens"):
        CommPlan.build(plan, varlen_causal([31]), 0)


def test_partial_backward_matches_autograd():
    torch.manual_seed(0)
    slices = random_slices(40, random.Random(3))
    q = torch.randn(40, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(40, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(40, 2, 8, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(40, 4, 8, dtype=torch.float64)
    out = dense_reference(q, k, v, slices)
    out.backward(dout)
    # two partials over disjoint key halves, merged, then backward partial by partial
    halves = [(AttnRange(0, 17), 0), (AttnRange(17, 40), 0)]
    parts, pieces = [], []
    for rng_, _ in halves:
        sl = restrict_slices(slices, ((AttnRange(0, 40), 0),), ((rng_, 0),), 40, rng_.size)
        pieces.append((rng_, sl))
        parts.append((0, *slice_attention(q.detach(), k.detach()[rng_.start:rng_.end],
                                           v.detach()[rng_.start:rng_.end], sl, backend="torch")))
    merged, lse = merge_partials(parts, 40, 4, 8, q.device, q.dtype)
    assert torch.allclose(merged, out.detach(), atol=TOL)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rng_, sl in pieces:
        gq, gk, gv = partial_attention_backward(q.detach(), k.detach()[rng_.start:rng_.end],
                                                v.detach()[rng_.start:rng_.end], sl, merged, lse, dout,
                                                backend="torch")
        dq += gq
        dk[rng_.start:rng_.end] += gk
        dv[rng_.start:rng_.end] += gv
    for got, want in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        assert torch.allclose(got, want, atol=TOL)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_backend_forward_matches_torch_on_cpu():
    torch.manual_seed(1)
    slices = random_slices(37, random.Random(5))
    q, k, v = torch.randn(37, 4, 8), torch.randn(37, 2, 8), torch.randn(37, 2, 8)
    with torch.no_grad():
        out_t, lse_t = slice_attention(q, k, v, slices, backend="torch")
        out_f, lse_f = slice_attention(q, k, v, slices, backend="flex")
    covered = torch.isfinite(lse_t)
    assert torch.equal(covered, torch.isfinite(lse_f))
    assert torch.allclose(out_f, out_t, atol=1e-5)
    assert torch.allclose(lse_f[covered], lse_t[covered], atol=1e-5)
    assert pick_backend(q, requires_grad=True) == "grouped"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend,dtype,atol", [("flex", torch.float32, 2e-3), ("flash", torch.bfloat16, 3e-2)])
def test_gpu_backends_match_reference(backend, dtype, atol):
    if backend == "flash":
        pytest.importorskip("flash_attn")
    torch.manual_seed(2)
    slices = random_slices(200, random.Random(9))
    q, k, v = (torch.randn(200, h, 64, device="cuda") for h in (4, 2, 2))
    want = dense_reference(q.double(), k.double(), v.double(), slices)
    with torch.no_grad():
        out, lse = slice_attention(q.to(dtype), k.to(dtype), v.to(dtype), slices, backend=backend)
    assert torch.allclose(out.double(), want, atol=atol)
    if backend == "flex":  # differentiable on CUDA, and the LSE gradient must be right
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        dout = torch.randn_like(q)
        ref = torch.autograd.grad(dense_reference(qg.double(), kg.double(), vg.double(), slices),
                                  (qg, kg, vg), dout.double())
        grads = partial_attention_backward(q, k, v, slices, out, lse, dout, backend="flex")
        for got, exp in zip(grads, ref):
            assert torch.allclose(got.double(), exp.double(), atol=atol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cp_attention_cuda_single_rank():
    """The whole CP path (autograd function, staged backward, flex kernels) on one CUDA rank."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        slices = packed_videos([[96, 96, 96], [80, 80]])
        plan = solve(slices, 1, 64)
        torch.manual_seed(3)
        q, k, v = (torch.randn(slices.total_q, h, 64, device="cuda", requires_grad=True) for h in (4, 2, 2))
        dout = torch.randn(slices.total_q, 4, 64, device="cuda")
        ref = dense_reference(q.double(), k.double(), v.double(), slices)
        ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
        ql, kl, vl = (dispatch(t.detach(), plan, 0).requires_grad_() for t in (q, k, v))
        out = undispatch(CPSliceAttention(dist.group.WORLD, plan, backend="flex")(ql, kl, vl, slices), plan,
                         dist.group.WORLD)
        out.backward(dout)
        assert torch.allclose(out.double(), ref, atol=2e-3)
        for local, want in zip((ql, kl, vl), ref_grads):
            assert torch.allclose(local.grad.double(), dispatch(want, plan, 0).double(), atol=2e-3)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# distributed: one spawn of 4 gloo ranks, subgroups of 1, 2 and 4
# ----------------------------------------------------------------------------------------


def _run_case(slices, plan, group, rank, stages, tag):
    torch.manual_seed(1234)  # identical global q, k, v, dout on every rank
    n = slices.total_q
    q = torch.randn(n, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n, 2, 8, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(n, 4, 8, dtype=torch.float64)
    ref = dense_reference(q, k, v, slices)
    ref.backward(dout)

    ql, kl, vl = (dispatch(t.detach(), plan, rank).requires_grad_() for t in (q, k, v))
    attn = CPSliceAttention(group, plan, overlap_stages=stages, backend="torch")
    out_local = attn(ql, kl, vl, slices)
    out = undispatch(out_local, plan, group)
    out.backward(dout)

    assert torch.allclose(out, ref, atol=TOL, rtol=0), f"{tag}: output {(out - ref).abs().max():.3g}"
    pad = local_positions(plan, rank) >= n
    for name, local, glob in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
        want = dispatch(glob.grad, plan, rank)
        err = (local.grad - want).abs().max()
        assert err < TOL, f"{tag}: {name} error {err:.3g}"
        assert bool((local.grad[pad] == 0).all()), f"{tag}: {name} leaks into padding"
    assert bool((out_local[pad] == 0).all()), f"{tag}: padding rows have output"


def _combos(cp: int, mask_index: int, full: bool):
    """(solver, overlap stages, chunk size) cases of one mask: all of them, or a rotation that
    still gives every (mask, stages) pair and every (solver, stages) pair across the masks."""
    names = solvers()
    if cp == 1:
        return [("contiguous", 1, 8)]
    cases = [(solver, stages, 16 if stages == 2 else 8) for solver in names for stages in (1, 2, 3)]
    if full:
        return cases
    return [c for c in cases if names.index(c[0]) == (mask_index + c[1]) % len(names)]


def _worker(rank, world, port, full):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        groups = {}
        for cp in (1, 2, 4):
            groups[cp], _ = dist.new_subgroups(cp)
        cases = 0
        for cp, group in groups.items():
            grank = dist.get_rank(group)
            for m, (name, slices) in enumerate(mask_cases().items()):
                for solver, stages, chunk in _combos(cp, m, full):
                    plan = solve(slices, cp, chunk, solver)
                    tag = f"cp={cp} {name} {solver} chunk={chunk} stages={stages}"
                    _run_case(slices, plan, group, grank, stages, tag)
                    cases += 1
        # bad input names the problem instead of hanging
        plan2 = solve(varlen_causal([30]), 2, 8)
        with pytest.raises(ValueError, match="cp=2"):
            CPSliceAttention(groups[4], plan2)(*(torch.zeros(plan2.local_seqlen, 2, 8),) * 3, varlen_causal([30]))
        with pytest.raises(ValueError, match="local tokens"):
            CPSliceAttention(groups[2], plan2)(*(torch.zeros(3, 2, 8),) * 3, varlen_causal([30]))
        # the per-batch plan is built once and shared by every layer's module
        mask = varlen_causal([30])
        rt = CPSliceAttention(groups[2], plan2).runtime(mask)
        assert isinstance(rt, CPAttnPlan) and CPSliceAttention(groups[2], plan2).runtime(varlen_causal([30])) is rt
        assert CPSliceAttention(groups[2], plan2, overlap_stages=2).runtime(mask) is not rt
        with pytest.raises(ValueError, match="no dispatch plan"):
            CPSliceAttention(groups[2], None)(*(torch.zeros(16, 2, 8),) * 3, mask)
        if rank == 0:
            print(f"cp attention: {cases} distributed cases passed on rank 0")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cp_attention_matches_dense_reference_distributed():
    """CP 1/2/4 x 6 masks x every stage count and solver (rotated): 42 cases, ~25 s."""
    mp.spawn(_worker, args=(4, _free_port(), False), nprocs=4, join=True)


@pytest.mark.slow
def test_cp_attention_full_matrix_distributed():
    """Every (mask, solver, stages) combination for CP 2 and 4: 114 cases, ~60 s."""
    mp.spawn(_worker, args=(4, _free_port(), True), nprocs=4, join=True)
