"""Dispatch solvers: valid plans, exact figures against dense masks, targets, and the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from magitrain.parallel.dispatch import (SOLVERS, AttnRange, ChunkCosts, DispatchPlan, main, needed_kv_ranges,
                                         plan_stats, remote_kv_ranges, rows_area_and_keys, solve)
from magitrain.parallel.mask import (AttnSlice, AttnSlices, MaskType, block_causal_video, packed_videos,
                                     sliding_window_causal, varlen_causal)

from conftest import REPO

ALL_SOLVERS = sorted(SOLVERS) + ["default"]
SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def random_masks(draw):
    """Small masks of random slices of every type (slices may overlap)."""
    total = draw(st.integers(1, 48))
    slices = []
    for _ in range(draw(st.integers(0, 5))):
        q0, q1 = sorted(draw(st.tuples(st.integers(0, total), st.integers(0, total))))
        k0, k1 = sorted(draw(st.tuples(st.integers(0, total), st.integers(0, total))))
        slices.append(AttnSlice(AttnRange(q0, q1), AttnRange(k0, k1), draw(st.sampled_from(list(MaskType)))))
    return AttnSlices(slices, total)


def brute_force_figures(plan: DispatchPlan, mask: AttnSlices):
    """Per-rank area (slice by slice, overlaps counted as the kernel computes them) and remote
    KV (needed by the rank's query rows in the dense mask, held by another rank)."""
    n = plan.padded_seqlen
    union = torch.zeros(n, n, dtype=torch.bool)
    per_slice = torch.zeros(n, n, dtype=torch.long)
    for s in mask:
        dense = AttnSlices([s], mask.total_q).to_dense()
        union[:mask.total_q, :mask.total_q] |= dense
        per_slice[:mask.total_q, :mask.total_q] += dense.long()
    area, remote = [], []
    for rank in range(plan.cp):
        held = torch.zeros(n, dtype=torch.bool)
        held[plan.local_positions(rank)] = True
        area.append(int(per_slice[held].sum()))
        remote.append(int((union[held].any(0) & ~held).sum()))
    return area, remote


def assert_valid_plan(plan: DispatchPlan, cp: int):
    counts = {len(r) for r in plan.ranks}
    assert len(plan.ranks) == cp and len(counts) == 1
    assert sorted(c for r in plan.ranks for c in r) == list(range(plan.num_chunks))
    assert all(list(r) == sorted(r) for r in plan.ranks)
    assert plan.padded_seqlen % (plan.chunk_size * cp) == 0 and plan.padded_seqlen >= plan.total_seqlen


@SETTINGS
@given(mask=random_masks(), cp=st.integers(1, 4), chunk_size=st.integers(1, 8),
       solver=st.sampled_from(ALL_SOLVERS))
def test_plans_are_valid_and_figures_exact(mask, cp, chunk_size, solver):
    plan = solve(mask, cp, chunk_size, solver)
    assert_valid_plan(plan, cp)
    stats = plan_stats(plan, mask)
    area, remote = brute_force_figures(plan, mask)
    assert stats.area == area
    assert stats.remote_kv_tokens == remote
    assert remote == [sum(r.size for r in remote_kv_ranges(plan, mask, rank)) for rank in range(cp)]


@SETTINGS
@given(lq=st.integers(1, 12), lk=st.integers(0, 12), rows=st.tuples(st.integers(0, 12), st.integers(0, 12)),
       mask_type=st.sampled_from(list(MaskType)))
def test_rows_area_and_keys_matches_dense(lq, lk, rows, mask_type):
    a, b = sorted(min(r, lq) for r in rows)
    s = AttnSlice(AttnRange(0, lq), AttnRange(0, lk), mask_type)
    dense = AttnSlices([s], max(lq, lk)).to_dense()[a:b, :lk]
    area, k_lo, k_hi = rows_area_and_keys(s, a, b)
    assert area == int(dense.sum())
    cols = torch.nonzero(dense.any(0)).flatten().tolist()
    assert (cols == list(range(k_lo, k_hi))) if cols else k_hi <= k_lo


def test_needed_kv_of_an_empty_band_is_empty():
    """A bi-causal slice with fewer keys than queries allows nothing, so it needs no KV."""
    mask = AttnSlices([AttnSlice(AttnRange(0, 10), AttnRange(0, 5), MaskType.BI_CAUSAL)], 10)
    assert mask.area() == 0
    assert needed_kv_ranges(mask, [AttnRange(0, 10)]) == []


def test_exact_small_layouts():
    causal = varlen_causal([8])
    plan = solve(causal, 2, 2, "contiguous")
    assert plan.ranks == ((0, 1), (2, 3))
    assert plan_stats(plan, causal).remote_kv_tokens == [0, 4]
    assert solve(causal, 2, 1, "zigzag").ranks == ((0, 1, 6, 7), (2, 3, 4, 5))
    # odd chunk count per rank: the first cp parts are one chunk longer
    assert solve(varlen_causal([6]), 2, 1, "zigzag").ranks == ((0, 1, 5), (2, 3, 4))


def chunk_area_mask(areas, chunk_size=16):
    """A mask whose chunk ``c`` (of ``chunk_size`` tokens) has attention area ``areas[c]``."""
    total = chunk_size * len(areas)
    return AttnSlices([AttnSlice(AttnRange(c * chunk_size, c * chunk_size + 1), AttnRange(0, a))
                       for c, a in enumerate(areas)], total)


def test_area_greedy_is_magiattentions_and_locality_beats_it():
    """Areas 11, 9, 7, 7, 6, 6 on 2 ranks of 3 chunks: greedy gives 24/22, the optimum is 23/23."""
    mask = chunk_area_mask([11, 9, 7, 7, 6, 6])
    greedy = solve(mask, 2, 16, "area_greedy")
    assert greedy.ranks == ((0, 3, 5), (1, 2, 4))
    assert plan_stats(greedy, mask).area == [24, 22]
    assert max(plan_stats(solve(mask, 2, 16), mask).area) == 23


# The five mask families of benchmarks/dispatch.py at 1/8 of the size: 8K tokens, cp=4, chunk 128.
K = 512
FAMILIES = {
    "magi_video": (block_causal_video([K] * 16), True),
    "causal": (varlen_causal([16 * K]), True),
    "varlen_causal": (varlen_causal([8 * K, 4 * K, 2 * K, K, K]), False),
    "sliding_window": (sliding_window_causal(16 * K, K), True),
    "packed_videos": (packed_videos([[K] * 8, [K] * 4, [K] * 2, [K], [K]]), False),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_locality_solver_targets(family):
    """``locality`` trades balance for locality only where it pays: on one sequence it keeps
    the baselines' balance."""
    mask, single_sequence = FAMILIES[family]
    ours = plan_stats(solve(mask, 4, 128, "locality"), mask)
    greedy = plan_stats(solve(mask, 4, 128, "area_greedy"), mask)
    assert ours.max_over_mean_area <= 1.05
    assert ours.total_remote_kv <= greedy.total_remote_kv
    if single_sequence:
        assert ours.max_over_mean_area <= greedy.max_over_mean_area + 1e-9
        assert ours.max_remote_kv <= greedy.max_remote_kv
    if family == "packed_videos":
        assert 2 * ours.total_remote_kv <= greedy.total_remote_kv


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_solver_targets(family):
    """``default`` (``structured``): the least remote KV within max(1.05, area_greedy + 0.01)."""
    mask, single_sequence = FAMILIES[family]
    ours = plan_stats(solve(mask, 4, 128), mask)
    greedy = plan_stats(solve(mask, 4, 128, "area_greedy"), mask)
    assert ours.max_over_mean_area <= max(1.05, greedy.max_over_mean_area + 0.01) + 1e-9
    assert ours.total_remote_kv <= plan_stats(solve(mask, 4, 128, "locality"), mask).total_remote_kv
    assert ours.max_remote_kv <= greedy.max_remote_kv
    if family == "packed_videos":
        assert 2 * ours.total_remote_kv <= greedy.total_remote_kv


def test_solver_is_deterministic():
    mask = FAMILIES["packed_videos"][0]
    assert solve(mask, 4, 128) == solve(mask, 4, 128)


def test_all_padding_mask():
    mask = AttnSlices([], 10)
    plan = solve(mask, 2, 4)
    assert_valid_plan(plan, 2)
    stats = plan_stats(plan, mask)
    assert stats.area == [0, 0] and stats.remote_kv_tokens == [0, 0] and stats.max_over_mean_area == 1.0


def test_bad_solver_arguments():
    mask = varlen_causal([8])
    with pytest.raises(ValueError, match="unknown dispatch solver"):
        solve(mask, 2, 2, "nope")
    with pytest.raises(ValueError, match="cp must be > 0"):
        solve(mask, 0, 2)
    with pytest.raises(ValueError, match="chunk_size must be > 0"):
        solve(mask, 2, -1)
    with pytest.raises(ValueError, match="chunk_size must be an integer"):
        ChunkCosts.build(mask, 2, 2.0)
    with pytest.raises(ValueError, match="plan has"):
        plan_stats(solve(mask, 2, 2), varlen_causal([16]))


def run_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "magitrain.parallel.dispatch", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_main(capsys, *args):
    """``main`` in this process (a subprocess costs a torch import): ``(rc, stdout, stderr)``."""
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def check_output(out: str, solver: str):
    obj = json.loads(out)
    for key in ("solver", "chunk_size", "cp", "ranks", "max_over_mean_area", "remote_kv_tokens", "solve_ms"):
        assert key in obj
    assert obj["solver"] == solver and obj["cp"] == 4 and obj["chunk_size"] == 16
    assert len(obj["remote_kv_tokens"]) == 4
    assert sorted(c for r in obj["ranks"] for c in r) == list(range(28))


def check_error(rc, out, err, args):
    assert rc == 2, (args, err)
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, (args, err)
    assert "Traceback" not in err


@pytest.fixture
def mask_files(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(packed_videos([[64] * 4, [64] * 2, [64]]).to_json()))
    bad_files = {
        "bad_json": "{oops",
        "not_object": "[1, 2]",
        "missing_key": json.dumps({"slices": []}),
        "bad_slice": json.dumps({"total_seqlen": 8, "slices": [[0, 8, 0]]}),
        "out_of_range": json.dumps({"total_seqlen": 8, "slices": [[0, 9, 0, 8, "full"]]}),
        "reversed": json.dumps({"total_seqlen": 8, "slices": [[4, 2, 0, 8, "full"]]}),
        "non_integer": json.dumps({"total_seqlen": 8, "slices": [[0, 8, 0, 7.5, "full"]]}),
        "unknown_type": json.dumps({"total_seqlen": 8, "slices": [[0, 8, 0, 8, "sideways"]]}),
    }
    for name, text in bad_files.items():
        (tmp_path / f"{name}.json").write_text(text)
    common = ["--cp", "4", "--chunk-size", "16"]
    bad_runs = [["--mask", str(tmp_path / f"{name}.json"), *common] for name in bad_files] + [
        ["--mask", str(tmp_path / "missing.json"), *common],
        ["--mask", str(good), *common, "--solver", "nope"],
        ["--mask", str(good), "--cp", "0", "--chunk-size", "16"],
        ["--mask", str(good), "--cp", "4", "--chunk-size", "-3"],
        ["--mask", str(good), "--cp", "four", "--chunk-size", "16"],
        ["--cp", "4", "--chunk-size", "16"],
    ]
    return ["--mask", str(good), *common], bad_runs


def test_cli_in_process(capsys, mask_files):
    good, bad_runs = mask_files
    rc, out, err = run_main(capsys, *good, "--solver", "zigzag")
    assert rc == 0, err
    check_output(out, "zigzag")
    for args in bad_runs:
        check_error(*run_main(capsys, *args), args)


def test_cli_subprocess(mask_files):
    """The real command line: a plan on stdout, and a one-line error with exit code 2."""
    good, bad_runs = mask_files
    runs = [good, bad_runs[0]]  # valid, bad JSON (every bad input is checked in process above)
    procs = [run_cli(*args) for args in runs]  # started together: each one imports torch
    (rc, out, err), *bad = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert rc == 0, err
    check_output(out, "structured")
    for args, result in zip(runs[1:], bad):
        check_error(*result, args)
