"""The checks only a GPU can make (issue 14), as one script for a lent GPU machine.

    python benchmarks/gpu_checks.py [--out DIR]        # on a CUDA machine: NCCL, flex compiled
    python benchmarks/gpu_checks.py --allow-cpu        # rehearsal on CPU (gloo): checks the script

Writes ``DIR/gpu_checks.log`` (default ``$OUT`` when set, else ``benchmarks/gpu_checks_out``): one
``PASS``/``FAIL`` line per check with its figures, then the tails of the runs' outputs. Checks:

1. ``torchrun --nproc_per_node 1`` training with ``parallel.backend=nccl`` (one GPU takes the same
   process groups as N: NCCL default group + gloo CPU groups), synchronous checkpoints every 2 of 8
   steps; then the same run with ``ckpt.async_save=true``: losses equal the synchronous run's;
2. kill -9 inside the background write of step 6 (async): steps 2 and 4 complete, ``auto`` picks 4,
   the resumed steps 5..8 equal the synchronous run's;
3. flex attention (compiled) forward + backward against the fp64 dense reference on MAGI packed
   videos, varlen causal and sliding-window masks, fp32 and bf16;
4. BlockMask construction at 64K tokens: peak host RSS rise (subprocess per size, 8K/32K/64K, and
   the old ``create_block_mask`` path at 8K) and CUDA memory of the mask once on the GPU, plus one
   compiled flex forward + backward at 64K in bf16 with its peak CUDA memory;
5. the async-checkpoint step-time benchmark on one GPU.

Budget: about 5 minutes on an H200 (compiles included). Nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

FAULT_ENTRY = r'''
import os, signal, sys
import magitrain.checkpoint as ckpt

class KillInsideWrite(ckpt.dcp.FileSystemWriter):
    def write_data(self, plan, planner):
        if "step_00000006" not in str(self.path):
            return super().write_data(plan, planner)
        super().write_data(plan, planner).wait()  # this rank's data is on disk; the marker is not
        os.kill(os.getpid(), signal.SIGKILL)

ckpt.dcp.FileSystemWriter = KillInsideWrite
from magitrain.train import main
sys.exit(main(sys.argv[1:]))
'''


class Log:
    def __init__(self, path: str):
        self.path, self.failed = path, []
        self.file = open(path, "w")

    def line(self, text: str) -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.line(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            self.failed.append(name)


def torchrun(out: str, name: str, overrides: list[str], backend: str, entry: list[str] | None = None) -> tuple[int, str]:
    run_dir = os.path.join(out, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           *(entry or ["-m", "magitrain.train"]), "--config", os.path.join(REPO, "configs", "tiny.yaml"),
           f"run.dir={run_dir}", "log.progress=false", "log.tensorboard=false", f"parallel.backend={backend}",
           "train.steps=8", "ckpt.every=2", "ckpt.keep_last=10", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    with open(os.path.join(out, f"{name}.out"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    return proc.returncode, proc.stdout + proc.stderr


def losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def check_training(log: Log, out: str, backend: str) -> None:
    from magitrain.checkpoint import Checkpointer

    rc, text = torchrun(out, "sync", [], backend)
    log.check("torchrun 1 rank, sync checkpoints", rc == 0 and "checkpoint:" in text, f"rc {rc}")
    if rc:
        log.line(text[-3000:])
        return
    want = losses(os.path.join(out, "sync"))
    rc, text = torchrun(out, "async", ["ckpt.async_save=true"], backend)
    got = losses(os.path.join(out, "async")) if rc == 0 else {}
    worst = max((abs(got[s] - want[s]) / abs(want[s]) for s in want if s in got), default=float("inf"))
    log.check("async checkpoints, same losses", rc == 0 and got.keys() == want.keys() and worst <= 1e-5,
              f"rc {rc}, max relative loss difference to sync {worst:.2e} (bitwise: {got == want})")
    entry = os.path.join(out, "kill_entry.py")
    with open(entry, "w") as f:
        f.write(FAULT_ENTRY)
    rc, text = torchrun(out, "killed", ["ckpt.async_save=true"], backend, entry=[entry])
    ck = Checkpointer(os.path.join(out, "killed"))
    steps = [s for s, _ in ck.complete_checkpoints()]
    log.check("kill -9 inside the async write of step 6", rc != 0 and steps == [2, 4] and ck.resolve("auto") == ck.path_for(4)
              and os.path.isdir(os.path.join(ck.root, ".tmp_step_00000006")),
              f"rc {rc}, complete checkpoints {steps}, auto -> {os.path.basename(ck.resolve('auto') or '-')}")
    rc, text = torchrun(out, "killed", ["ckpt.async_save=true", "ckpt.resume=auto"], backend)
    got = losses(os.path.join(out, "killed")) if rc == 0 else {}
    worst = max((abs(got[s] - want[s]) / abs(want[s]) for s in range(5, 9) if s in got), default=float("inf"))
    log.check("resume after the kill", rc == 0 and "at step 4" in text and all(s in got for s in range(5, 9))
              and worst <= 1e-5, f"rc {rc}, steps 5..8 max relative loss difference to sync {worst:.2e}")


def check_flex(log: Log, device) -> None:
    import torch

    from magitrain.parallel.kernels import partial_attention_backward, slice_attention
    from magitrain.parallel.mask import packed_videos, sliding_window_causal, varlen_causal
    from test_cp_attention import dense_reference

    masks = {"magi_packed_videos": packed_videos([[200, 200, 200], [150, 150], [77]]),
             "varlen_causal": varlen_causal([300, 411, 266]), "sliding_window": sliding_window_causal(900, 128)}
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 3e-2)):
        for name, slices in masks.items():
            torch.manual_seed(0)
            n = slices.total_q
            q, k, v = (torch.randn(n, h, 64, device=device) for h in (8, 2, 2))
            dout = torch.randn(n, 8, 64, device=device)
            qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
            ref = dense_reference(qd, kd, vd, slices)
            ref_grads = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
            args = [t.to(dtype) for t in (q, k, v)]
            with torch.no_grad():
                out, lse = slice_attention(*args, slices, backend="flex")
            grads = partial_attention_backward(*args, slices, out, lse, dout.to(dtype), backend="flex")
            scale = max(float(ref.abs().max()), 1.0)
            err_out = float((out.double() - ref).abs().max()) / scale
            err_grad = max(float((g.double() - r).abs().max()) / max(float(r.abs().max()), 1e-6)
                           for g, r in zip(grads, ref_grads))
            log.check(f"flex fwd+bwd vs fp64 reference, {name}, {str(dtype)[6:]}", err_out <= tol and err_grad <= tol,
                      f"output err / max {err_out:.2e}, worst gradient err / max {err_grad:.2e} (tolerance {tol:g})")


def check_block_mask(log: Log) -> None:
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "block_mask_memory.py")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    log.line(proc.stdout.strip() or proc.stderr[-2000:])
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 65536 | from slice")]
    mb = float(rows[0].split("|")[3]) if rows else float("inf")
    log.check("BlockMask construction at 64K tokens (host RSS rise)", proc.returncode == 0 and mb < 100, f"{mb:.1f} MB")


def check_block_mask_cuda(log: Log, device) -> None:
    """The mask on the GPU and one compiled flex forward + backward at 64K tokens, bf16."""
    import importlib.util

    import torch

    from magitrain.parallel import kernels

    spec = importlib.util.spec_from_file_location("block_mask_memory", os.path.join(REPO, "benchmarks", "block_mask_memory.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    slices = bench.magi_packed_videos(65536)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    kernels._flex_block_mask(slices, device)
    torch.cuda.synchronize()
    built = time.perf_counter() - t0
    mask_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    log.check("BlockMask at 64K on the GPU", mask_mb < 100, f"{mask_mb:.1f} MB of CUDA memory, built in {built:.2f} s")
    q, k, v = (torch.randn(65536, h, 128, device=device, dtype=torch.bfloat16, requires_grad=True) for h in (8, 8, 8))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out, _ = kernels.slice_attention(q, k, v, slices, backend="flex")
    out.float().sum().backward()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    dense_mb = 65536 * 65536 * 8 / 2**20  # one bf16 score matrix per head: what a dense path would hold
    log.check("flex fwd+bwd at 64K tokens, bf16, compiled", bool(torch.isfinite(q.grad).all()) and peak_mb < dense_mb / 4,
              f"peak CUDA memory above inputs {peak_mb:.0f} MB (a dense 8-head score matrix: {dense_mb:.0f} MB), "
              f"{first:.1f} s including compilation")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "benchmarks", "gpu_checks_out"))
    parser.add_argument("--allow-cpu", action="store_true", help="rehearse on CPU (gloo, eager flex): no GPU figures")
    args = parser.parse_args()
    import torch

    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "gpu_checks.log"))
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        log.line("error: no CUDA device (use --allow-cpu to rehearse the script on CPU)")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    log.line(f"gpu_checks: torch {torch.__version__}, device {torch.cuda.get_device_name() if cuda else 'cpu'}, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    backend = "nccl" if cuda else "gloo"
    steps = [("training", lambda: check_training(log, args.out, backend)),
             ("flex", lambda: check_flex(log, device) if cuda else log.line("skip flex: needs CUDA (eager CPU flex has no backward)")),
             ("block mask", lambda: check_block_mask(log)),
             ("block mask cuda", lambda: check_block_mask_cuda(log, device) if cuda else log.line("skip: CUDA memory")),
             ("async benchmark", lambda: log.line(subprocess.run(
                 [sys.executable, os.path.join(REPO, "benchmarks", "async_checkpoint.py"), "--world", "1", "--steps", "16"],
                 cwd=REPO, capture_output=True, text=True, timeout=600).stdout.strip()[-1500:]))]
    for name, step in steps:
        t0 = time.perf_counter()
        try:
            step()
        except Exception:  # noqa: BLE001 - one broken check must not hide the others
            log.check(name, False, traceback.format_exc()[-2000:])
        log.line(f"-- {name}: {time.perf_counter() - t0:.1f} s")
    log.line(f"done: {len(log.failed)} failed {log.failed}")
    return 1 if log.failed else 0


if __name__ == "__main__":
    sys.exit(main())
