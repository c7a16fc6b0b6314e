"""CPU attention kernels, A against B: the per-slice reference (``torch``) vs the grouped kernel
(``grouped``, the CPU default), forward + backward of the demo's attention calls.

    python benchmarks/cpu_attention.py [--repeats 15]

Masks (the shapes the demo's 2 x 64 model sees, 4 heads of 16, 2 KV heads):

- ``demo self``: a packed 1024-token sequence of 8 clips x 4 chunks of 32 tokens, block-causal;
- ``demo cross``: the same rows against 8 captions of 8 tokens (each chunk sees its clip's caption);
- ``one video``: one 4096-token video of 16 chunks of 256 (few, large slices: where grouping has
  nothing to batch);
- ``sliding window``: 2048 tokens, window 128 (one sparse slice per row band).

Each repeat times both kernels back to back on the same inputs (the order alternates), one thread.
Prints min / median / max milliseconds per call and the median ratio, as a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from magitrain.parallel.kernels import slice_attention
from magitrain.parallel.mask import AttnSlice, AttnSlices, block_causal_video, packed_videos, sliding_window_causal


def demo_cross(clips: int = 8, chunks: int = 4, chunk_tokens: int = 32, caption_tokens: int = 8) -> AttnSlices:
    slices = []
    for c in range(clips):
        for k in range(chunks):
            q0 = (c * chunks + k) * chunk_tokens
            slices.append(AttnSlice((q0, q0 + chunk_tokens), (c * caption_tokens, (c + 1) * caption_tokens)))
    return AttnSlices(slices, clips * chunks * chunk_tokens, clips * caption_tokens)


def masks() -> dict[str, AttnSlices]:
    return {"demo self": packed_videos([[32] * 4] * 8), "demo cross": demo_cross(),
            "one video": block_causal_video([256] * 16), "sliding window": sliding_window_causal(2048, 128)}


def time_call(backend: str, q, k, v, slices) -> float:
    t = time.perf_counter()
    out, _ = slice_attention(q, k, v, slices, backend=backend)
    out.sum().backward()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| mask | slices | torch (per slice) ms, min / median / max | grouped ms, min / median / max | speed-up (median) |")
    print("|---|---|---|---|---|")
    for name, slices in masks().items():
        g = torch.Generator().manual_seed(0)
        q = torch.randn(slices.total_q, 4, 16, generator=g, requires_grad=True)
        k, v = (torch.randn(slices.total_k, 2, 16, generator=g, requires_grad=True) for _ in range(2))
        times = {"torch": [], "grouped": []}
        for b in times:  # warm-up (and the grouped kernel's plan, cached per mask as in training)
            time_call(b, q, k, v, slices)
        for r in range(args.repeats):
            for b in (("torch", "grouped") if r % 2 == 0 else ("grouped", "torch")):
                times[b].append(time_call(b, q, k, v, slices) * 1e3)
        cells = [f"{min(t):.1f} / {statistics.median(t):.1f} / {max(t):.1f}" for t in times.values()]
        ratio = statistics.median(times["torch"]) / statistics.median(times["grouped"])
        print(f"| {name} | {len(slices)} | {cells[0]} | {cells[1]} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
