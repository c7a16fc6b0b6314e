"""Activation memory per transformer layer with sequence parallelism at tp=2 vs without.

    python benchmarks/sequence_parallel.py [--tokens 2048] [--hidden 512] [--layers 2]

The 24B recipe's layer shape at a CPU-sized width (SwiGLU MLP, GQA 4:1, half-channel VAE):
hidden ``--hidden``, heads of 64 channels, ffn = 8/3 hidden. One packed sequence of
``--tokens`` tokens (one video of 4 chunks). Per layout (tp=1 on one process; tp=2 without and
with ``parallel.sequence_parallel`` on 2 gloo ranks), on rank 0:

- saved for backward: the bytes autograd keeps for the backward of ONE layer's forward (no
  activation checkpointing): every tensor packed by ``saved_tensors_hooks`` while the layer
  runs, counted once per storage, parameters (and their local views) excluded; split into what
  the attention kernels keep (the CPU backend's dense score blocks, sharded by heads under TP
  and backend-specific: a flash kernel keeps only its output and log-sum-exp) and the rest;
- layer input: the bytes of the residual stream ``h`` entering the layer, which is what full
  activation checkpointing keeps per layer instead.

Both are exactly what the layer holds until its backward; they do not depend on the machine's
speed or load. Prints one markdown table row per layout.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(run_dir: str, tp: int, sp: bool, args):
    from magitrain.config import load_config

    hidden, heads = args.hidden, args.hidden // 64
    side = int((args.tokens // 8) ** 0.5) * 2  # 8 latent frames of (side/2)^2 patches
    return load_config(os.path.join(REPO, "configs", "tiny.yaml"), [
        f"run.dir={run_dir}", "log.progress=false", "log.tensorboard=false",
        f"model.num_layers={args.layers}", f"model.hidden_size={hidden}", f"model.num_heads={heads}",
        f"model.num_kv_heads={max(1, heads // 4)}", "model.head_dim=64", f"model.ffn_hidden_size={hidden * 8 // 3 // 64 * 64}",
        "model.gated_linear_unit=true", "model.half_channel_vae=true", "model.in_channels=8", "model.out_channels=8",
        "data.frames=8", f"data.height={side}", f"data.width={side}", "data.samples_per_seq=1",
        f"data.seq_tokens={8 * (side // 2) ** 2}", "data.batch_size=1",
        f"parallel.tp={tp}", f"parallel.sequence_parallel={str(sp).lower()}"])


def layer_bytes(cfg) -> tuple[int, int, int]:
    """Bytes saved for backward by layer 0's forward outside and inside the attention kernels,
    and the bytes of its input ``h``, on this rank."""
    from magitrain.data import build_data_source
    from magitrain.diffusion import noise_batch
    from magitrain.model import MagiDiT
    from magitrain.parallel.mesh import init_parallel
    from magitrain.parallel.parallelize import parallelize_model
    from torch.distributed.tensor import DTensor

    env = init_parallel(cfg)
    torch.manual_seed(0)
    model = parallelize_model(MagiDiT(cfg.model), env, cfg)
    batch = build_data_source(cfg, 0, 1).next_batch()
    nb = noise_batch(batch, cfg.diffusion, 0, 0)
    params = {(p._local_tensor if isinstance(p, DTensor) else p).untyped_storage().data_ptr()
              for p in model.parameters()}
    seen, active, inputs = {}, [False], []

    def pack(t):
        if active[0]:
            local = t._local_tensor if isinstance(t, DTensor) else t
            ptr = local.untyped_storage().data_ptr()
            if ptr not in params:
                bucket = kernel_seen if in_kernel[0] else seen
                bucket[ptr] = max(bucket.get(ptr, 0), local.untyped_storage().nbytes())
        return t

    attn, in_kernel, kernel_seen = model.layers[0].self_attention, [False], {}
    attend = attn.attend

    def attend_marked(*a):  # what the attention kernels keep (CPU: dense score blocks; GPU: far less)
        in_kernel[0] = True
        try:
            return attend(*a)
        finally:
            in_kernel[0] = False

    attn.attend = attend_marked

    layer = model.layers[0]
    def enter(module, args):
        active[0] = True
        inputs.append(args[0].nbytes)

    layer.register_forward_pre_hook(enter)
    layer.register_forward_hook(lambda m, a, o: active.__setitem__(0, False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(nb.x_t, nb.t, batch.text_emb, batch.text_mask, batch.layout)
    out.sum().backward()
    return sum(seen.values()), sum(kernel_seen.values()), inputs[0]


def _worker(rank, world, port, root, tp, sp, args):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    figures = layer_bytes(_config(root, tp, sp, args))
    if rank == 0:
        with open(os.path.join(root, "bytes"), "w") as f:
            f.write(" ".join(map(str, figures)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args(argv)
    if args.hidden % 256 or args.tokens % 8:
        print("error: --hidden must be a multiple of 256 and --tokens of 8", file=sys.stderr)
        return 2
    print(f"tokens {args.tokens}, hidden {args.hidden}, SwiGLU, GQA 4:1; one layer, rank 0")
    print("| layout | saved for backward outside attention kernels, MB | vs tp=1 | inside attention kernels (CPU), MB "
          "| layer input (full AC keeps), MB | vs tp=1 |")
    print("|---|---|---|---|---|---|")
    base = None
    for tp, sp in ((1, False), (2, False), (2, True)):
        with tempfile.TemporaryDirectory() as root:
            if tp == 1:
                saved, kernel, inp = layer_bytes(_config(root, 1, False, args))
            else:
                mp.spawn(_worker, args=(tp, _free_port(), root, tp, sp, args), nprocs=tp)
                saved, kernel, inp = map(int, open(os.path.join(root, "bytes")).read().split())
        base = base or (saved, inp)
        name = "tp=1" if tp == 1 else f"tp={tp}" + (" + SP" if sp else "")
        print(f"| {name} | {saved / 1e6:.2f} | {saved / base[0]:.3f} | {kernel / 1e6:.2f} | {inp / 1e6:.2f} "
              f"| {inp / base[1]:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
