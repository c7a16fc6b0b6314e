"""Activation checkpointing (parallel.activation_checkpointing = full | every_k) leaves the
gradients unchanged: the recompute reruns the same operations (and, under TP/SP/CP, the same
collectives in the same order on every rank).

Fast: one process, the 24B-style tiny model (SwiGLU, half-channel, GQA), step-1 gradients of
``full`` and ``every_k`` against ``none``. Slow: the same under FSDP2 (over cp) + TP (tp=2, with
sequence parallelism) + CP (cp=2) on 4 gloo ranks. The recompute repeats the forward bit for
bit on one machine; we allow 1e-6 of the largest gradient entry (observed: 0).
"""

import os

import pytest
import torch
import torch.multiprocessing as mp

from test_parallel_layouts import _free_port, _max_errors, layout_cfg, step_grads
from test_tensor_parallel_parity import FAST, MAGI24_STYLE

AC_TOL = 1e-6
MODES = [["parallel.activation_checkpointing=none"],
         ["parallel.activation_checkpointing=full"],
         ["parallel.activation_checkpointing=every_k", "parallel.ac_every=2"]]
MODEL = [*MAGI24_STYLE, "model.num_layers=3"]  # every_k=2 wraps blocks 0 and 2, not 1


def _grads(root, layout, mode, *extra):
    name = os.path.join(root, mode[0].split("=")[1])
    return step_grads(layout_cfg(name, layout, *MODEL, *FAST, *mode, *extra))


def _assert_equal_to_none(results):
    ref = results["none"]
    for mode, got in results.items():
        rel, err = _max_errors(got, ref)
        print(f"activation_checkpointing={mode}: loss/grad-norm rel err {rel:.2e}, gradient err / scale {err:.2e}")
        assert rel <= AC_TOL and err <= AC_TOL, (mode, rel, err)


def test_checkpointing_keeps_gradients_one_process(tmp_path):
    from magitrain.model import MagiDiT
    from magitrain.parallel.activation_checkpoint import apply_activation_checkpointing

    model = MagiDiT(layout_cfg(str(tmp_path), (1, 1, 1), *MODEL).model)
    assert apply_activation_checkpointing(model, "every_k", 2) == 2  # blocks 0 and 2 of 3
    _assert_equal_to_none({m[0].split("=")[1]: _grads(str(tmp_path), (1, 1, 1), m) for m in MODES})


def _worker(rank, world, port, root):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    for mode in MODES:
        grads = _grads(root, (1, 2, 2), mode, "parallel.sequence_parallel=true")
        if rank == 0:
            torch.save(grads, os.path.join(root, mode[0].split("=")[1] + ".pt"))


@pytest.mark.slow
def test_checkpointing_keeps_gradients_under_fsdp_tp_sp_cp(tmp_path):
    root = str(tmp_path)
    mp.spawn(_worker, args=(4, _free_port(), root), nprocs=4)
    _assert_equal_to_none({m[0].split("=")[1]: torch.load(os.path.join(root, m[0].split("=")[1] + ".pt"),
                                                          weights_only=True) for m in MODES})
