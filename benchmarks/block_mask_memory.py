"""Peak resident memory of building flex_attention's BlockMask for the MAGI packed-video mask.

    python benchmarks/block_mask_memory.py [--sizes 8192 32768 65536] [--old-sizes 8192]

Each measurement runs in a fresh subprocess: build the mask's slices, reset the process's peak
resident set (``/proc/self/clear_refs``), build the BlockMask, and report the rise of the peak
(``VmHWM``) over the resident set just before. ``new``: from the slice ranges
(``parallel/kernels.py`` -> ``parallel/block_mask.py``); ``old``: the previous path,
``create_block_mask`` run eagerly over the same mask function (it evaluates every token pair).

The mask: packed videos of 8, 4, 2, 1 and 1 chunks of ``N / 16 - 24`` tokens each, padded to N
(MAGI-1's training mask: a chunk sees its own and all earlier chunks of its video; chunk edges
fall inside 128-token blocks, so there are partial blocks as with real latent grids).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def magi_packed_videos(n: int):
    from magitrain.parallel.mask import packed_videos

    chunk = n // 16 - 24  # not a multiple of the 128-token block: chunk edges cut blocks (partial ones)
    return packed_videos([[chunk] * c for c in (8, 4, 2, 1, 1)], total=n)  # the tail: padding


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def build(slices, path: str):
    import torch

    from magitrain.parallel import kernels

    if path == "new":
        return kernels._flex_block_mask(slices, torch.device("cpu"))
    from torch.nn.attention.flex_attention import create_block_mask

    n = slices.total_q
    return create_block_mask(kernels.interval_mask_mod(slices), None, None, n, n, device="cpu")


def measure(n: int, path: str) -> dict:
    """In this process: peak resident-memory rise (MB) and seconds of one construction."""
    import torch
    import torch.nn.attention.flex_attention  # noqa: F401 - imported before the measurement

    from magitrain.parallel import kernels

    torch.set_num_threads(1)
    build(magi_packed_videos(1024), path)  # first use of the ops (library warm-up) is not the mask's cost
    kernels._BLOCK_MASKS.clear()
    slices = magi_packed_videos(n)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    mask = build(slices, path)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    blocks = int(mask.kv_num_blocks.sum()), int(mask.full_kv_num_blocks.sum())
    return {"tokens": n, "path": path, "peak_rise_mb": (peak - before) / 1024, "seconds": seconds,
            "partial_blocks": blocks[0], "full_blocks": blocks[1]}


def run_in_subprocess(n: int, path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", str(n), path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[8192, 32768, 65536])
    parser.add_argument("--old-sizes", type=int, nargs="*", default=[8192])
    parser.add_argument("--one", nargs=2, metavar=("TOKENS", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1])))
        return
    rows = [run_in_subprocess(n, "new") for n in args.sizes] + [run_in_subprocess(n, "old") for n in args.old_sizes]
    print("| tokens | construction | peak RSS rise MB | seconds | partial / full blocks |")
    print("|---|---|---|---|---|")
    for r in rows:
        name = "from slice ranges" if r["path"] == "new" else "create_block_mask (old)"
        print(f"| {r['tokens']} | {name} | {r['peak_rise_mb']:.1f} | {r['seconds']:.2f} | "
              f"{r['partial_blocks']} / {r['full_blocks']} |")


if __name__ == "__main__":
    main()
