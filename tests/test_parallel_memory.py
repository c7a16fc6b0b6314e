"""Layout validation, memory (optimizer state per rank under FSDP2, activation checkpointing),
the sharded gradient norm, and the checkpoint metadata reader's refusal of foreign pickles."""

import os
import pickle
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_config
from magitrain.config import ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("overrides, world, key", [
    (["parallel.dp=2"], 4, "WORLD_SIZE"),
    (["parallel.tp=16", "model.num_heads=16", "model.num_kv_heads=16"], 16, "must divide 8"),  # linear_proj's groups
    (["parallel.tp=2", "parallel.dp=2", "parallel.dp_engine=deepspeed"], 4, "parallel.dp_engine"),
])
def test_bad_layouts_fail_at_start_naming_the_key(tmp_path, monkeypatch, overrides, world, key):
    from magitrain.parallel.mesh import init_parallel

    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = tiny_config(tmp_path, *overrides)
    with pytest.raises(ConfigError, match=key):
        init_parallel(cfg)


def test_cp_sequence_shorter_than_chunks_fails(tmp_path):
    with pytest.raises(ConfigError, match="parallel.cp_chunk_size"):
        tiny_config(tmp_path, "parallel.cp=4", "parallel.cp_chunk_size=128")


def _saved_bytes(model, x_args) -> int:
    """Bytes autograd keeps for the backward of one forward (outside checkpointed regions)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*x_args).sum().backward()
    return total


def test_activation_checkpointing_lowers_saved_activations(tmp_path):
    from magitrain.data import build_data_source
    from magitrain.diffusion import noise_batch
    from magitrain.model import MagiDiT
    from magitrain.parallel.activation_checkpoint import apply_activation_checkpointing

    cfg = tiny_config(tmp_path, "model.num_layers=4")
    batch = build_data_source(cfg, 0, 1).next_batch()
    nb = noise_batch(batch, cfg.diffusion, 0, 0)
    args = (nb.x_t, nb.t, batch.text_emb, batch.text_mask, batch.layout)
    measured = {}
    for mode in ("none", "every_k", "full"):
        torch.manual_seed(0)
        model = MagiDiT(cfg.model)
        apply_activation_checkpointing(model, mode, every=2)
        measured[mode] = _saved_bytes(model, args)
    print("saved activation bytes:", measured)
    assert measured["full"] < measured["every_k"] < measured["none"]
    assert measured["full"] < 0.5 * measured["none"]


def _optimizer_bytes(cfg) -> int:
    from torch.distributed.tensor import DTensor

    from magitrain.model import MagiDiT
    from magitrain.parallel.mesh import init_parallel
    from magitrain.parallel.parallelize import parallelize_model
    from magitrain.train import build_optimizer

    env = init_parallel(cfg)
    torch.manual_seed(0)
    model = parallelize_model(MagiDiT(cfg.model), env, cfg)
    opt = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    local = lambda t: t._local_tensor if isinstance(t, DTensor) else t  # noqa: E731
    return sum(local(v).numel() * local(v).element_size()
               for st in opt.state.values() for k, v in st.items() if k != "step")


def _memory_worker(rank, world, port, root):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    cfg = tiny_config(root, "parallel.dp=2", "model.num_layers=4", "model.hidden_size=128", "model.head_dim=32",
                      "model.ffn_hidden_size=512")
    with open(os.path.join(root, f"opt_bytes_{rank}"), "w") as f:
        f.write(str(_optimizer_bytes(cfg)))


def test_fsdp2_optimizer_state_per_rank_falls_with_dp(tmp_path):
    one = tiny_config(tmp_path, "model.num_layers=4", "model.hidden_size=128", "model.head_dim=32",
                      "model.ffn_hidden_size=512")
    full = _optimizer_bytes(one)
    mp.spawn(_memory_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    per_rank = [int(open(os.path.join(tmp_path, f"opt_bytes_{r}")).read()) for r in range(2)]
    print(f"optimizer state bytes: 1 process {full}, dp=2 per rank {per_rank}")
    for b in per_rank:
        assert abs(b / full - 0.5) <= 0.1 * 0.5, (b, full)


class _Gadget:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_dcp_metadata_reader_refuses_foreign_pickles(tmp_path):
    from magitrain.checkpoint import Checkpointer, CheckpointError

    ck = Checkpointer(str(tmp_path))
    path = ck.save(1, {"w": {"a": torch.ones(3)}, "n": {"k": 2}}, "")
    loaded = Checkpointer.load(path)
    assert torch.equal(loaded["w"]["a"], torch.ones(3)) and loaded["n"] == {"k": 2}
    with open(os.path.join(path, "tensors", ".metadata"), "wb") as f:
        pickle.dump(_Gadget(), f)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        Checkpointer.load(path)
