"""Shared pieces of the LoRA tests: the MAGI-1 tiny reference imported as a base, a tiny random base,
and one LoRA training step's adapter gradients under any layout."""

import os
import shutil

import torch
from conftest import REPO, SHARED

REF = os.path.join(SHARED, "data", "magi1_tiny_reference")
# a LoRA run on the MAGI-1 tiny reference (hidden 256, 16 latent channels): 2 chunks of 2 x 4 x 4 tokens per clip
MAGI1_DATA = ["data.frames=4", "data.height=8", "data.width=8", "data.samples_per_seq=2", "data.seq_tokens=128",
              "parallel.cp_chunk_size=16"]


def import_magi1_reference(root: str) -> str:
    """The reference weights as ``release import`` makes them (a weights-only checkpoint); returns its run dir."""
    from magitrain.release import import_release

    rel, base = os.path.join(root, "magi1_release"), os.path.join(root, "magi1_base")
    if not os.path.isdir(base):
        os.makedirs(rel, exist_ok=True)
        shutil.copy(os.path.join(REF, "weights.safetensors"), os.path.join(rel, "model.safetensors"))
        shutil.copy(os.path.join(REF, "config.json"), os.path.join(rel, "config.json"))
        import_release(rel, base, log=lambda m: None)
    return base


def tiny_base(root: str, seed: int = 3) -> str:
    """configs/tiny.yaml's model with random weights (final layer not zero), imported as a base."""
    from safetensors.torch import save_file

    from magitrain.config import load_config, save_config
    from magitrain.model import MagiDiT
    from magitrain.release import import_release

    rel, base = os.path.join(root, "tiny_release"), os.path.join(root, "tiny_base")
    if not os.path.isdir(base):
        cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"))
        torch.manual_seed(seed)
        m = MagiDiT(cfg.model)
        torch.nn.init.normal_(m.final_linear.linear.weight, std=0.02)
        os.makedirs(rel, exist_ok=True)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, os.path.join(rel, "model.safetensors"))
        save_config(cfg, os.path.join(rel, "config.yaml"))
        import_release(rel, base, log=lambda m: None)
    return base


def lora_cfg(base: str, run_dir: str, *overrides):
    from magitrain.config import load_config

    return load_config(os.path.join(base, "config.yaml"),
                       [f"run.dir={run_dir}", f"ckpt.init_from={base}", "model.lora.rank=4", "log.progress=false",
                        "log.tensorboard=false", "optim.warmup_steps=1", "ckpt.every=0", *overrides])


def build_lora_model(cfg, env):
    from magitrain.parallel.parallelize import parallelize_model

    from magitrain.distill import load_init
    from magitrain.lora import apply_lora
    from magitrain.model import MagiDiT

    torch.manual_seed(cfg.train.seed)
    model = MagiDiT(cfg.model).to(env.device)
    load_init(model, cfg.ckpt.init_from)
    lo = cfg.model.lora
    return parallelize_model(model, env, cfg, adapters=lambda m, mesh: apply_lora(m, lo.rank, lo.alpha, lo.targets,
                                                                                   cfg.train.seed, mesh))


def lora_step_grads(cfg) -> dict:
    """Step 0's and step 1's losses and step 1's adapter gradients (unclipped: pass a huge optim.grad_clip)."""
    from magitrain.parallel.mesh import init_parallel
    from torch.distributed.tensor import DTensor

    from magitrain.data import build_data_source
    from magitrain.train import build_optimizer, train_step

    env = init_parallel(cfg)
    model = build_lora_model(cfg, env)
    data = build_data_source(cfg, env.dp_rank, env.dp)
    micro = lambda: [data.next_batch() for _ in range(cfg.train.grad_accum)]
    out0 = train_step(model, micro(), cfg, env, 0, build_optimizer(model, cfg))
    grads = {}

    class Capture:
        def step(self):
            for name, p in model.named_parameters():
                if p.grad is not None:
                    g = p.grad
                    grads[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()

        def zero_grad(self, set_to_none=True):
            model.zero_grad(set_to_none=set_to_none)

    out1 = train_step(model, micro(), cfg, env, 1, Capture())
    return {**grads, "loss0": torch.tensor(out0["loss"]), "loss1": torch.tensor(out1["loss"]),
            "grad_norm": torch.tensor(out1["grad_norm"])}
