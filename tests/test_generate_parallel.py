"""Streaming generation on many ranks (magitrain/parallel_generate.py) against the one-process
sampler: TP, CP and TP x CP on gloo, fp32, 1e-5 relative, for windows 1, 2, 4 with prompt
switches, a prefix, a sliding context (``max_context_chunks``) and 2- and 3-pass guidance;
the per-rank KV-cache bytes at cp=2 and cp=4; the CLI under torchrun-style env loading a
checkpoint saved at dp=2 x tp=2 into a cp=2 run (slow).

One 4-rank spawn runs the layouts in turn, each on a device mesh over the same 4 processes:
tp=2 and cp=2 as two data-parallel replicas of the layout (both replicas are checked),
2x2 (tp=2 x cp=2) and cp=4. The reference runs in the test process. Default suite: 2x2 and
cp=4 on one case that has everything (window 2, 3-pass guidance, prompt switches, a prefix
with a partly covered chunk, a sliding context). Slow suite: every layout x windows 1, 2, 4.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_generate import H, W, make_model, make_text

from magitrain.sampler import ChunkSampler, SamplerConfig

RTOL = 1e-5
CHUNKS = 5
# (window, sampler options, prefix frames): every feature at least once per layout
CASES = [
    (2, dict(steps=2, cfg_scale=2.0, history_scale=1.5, max_context_chunks=1), 3),  # the default suite's
    (1, dict(steps=2, max_context_chunks=2), 0),
    (2, dict(steps=4, cfg_scale=3.0), 3),
    (4, dict(steps=4, cfg_scale=2.0, history_scale=1.5, max_context_chunks=2), 2),
]
# (dp, cp, tp) over 4 processes
LAYOUTS = [(1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1)]
FAST = (LAYOUTS[:2], CASES[:1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(case):
    window, opts, prefix_frames = case
    emb, mask = make_text(CHUNKS, switches=(1, 3))
    prefix = None
    if prefix_frames:
        g = torch.Generator().manual_seed(5)
        prefix = torch.randn(4, prefix_frames, H, W, generator=g)
    return emb, mask, SamplerConfig(window=window, **opts), prefix


def _worker(rank, world, port, out_dir, layouts, cases):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from magitrain.parallel.tensor_parallel import apply_tensor_parallel
    from torch.distributed.device_mesh import init_device_mesh

    from magitrain.parallel_generate import ParallelChunkSampler

    dist.init_process_group("gloo")
    results = {}
    for dp, cp, tp in layouts:
        mesh = init_device_mesh("cpu", (dp, cp, tp), mesh_dim_names=("dp", "cp", "tp"))
        model = make_model()
        if tp > 1:
            apply_tensor_parallel(model, mesh["tp"])
        for i, case in enumerate(cases):
            emb, mask, sc, prefix = _inputs(case)
            sampler = ParallelChunkSampler(model, emb, mask, H, W, sc, prefix,
                                           cp_group=mesh["cp"].get_group() if cp > 1 else None, chunk_size=4,
                                           overlap_stages=2)
            out = sampler.generate()
            key = f"{dp}{cp}{tp}_{i}"
            results[key] = out
            results[key + "_cache"] = torch.tensor([sampler.cache.nbytes(), sampler.cache.num_chunks])
    if len(cases) > 1:  # slow run: validation's entry point on a model parallelized for training
        results["train_layout"] = _sample_on_training_layout(cases[0])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(tmp_path_factory, layouts, cases):
    out = str(tmp_path_factory.mktemp("gen_parallel"))
    mp.spawn(_worker, args=(4, _free_port(), out, layouts, cases), nprocs=4)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(4)]


def _sample_on_training_layout(case):
    """``sample_video`` with a model that ``parallelize_model`` prepared for training at dp=2 x tp=2
    (FSDP2 over dp, TP, no CP) and at cp=2 x tp=2 (FSDP2 over cp, CP attention installed)."""
    import dataclasses

    import torch.distributed as dist
    from magitrain.parallel.mesh import ParallelEnv
    from magitrain.parallel.parallelize import parallelize_model
    from test_generate import TINY
    from torch.distributed.device_mesh import init_device_mesh

    from magitrain.config import Config, ModelConfig, ParallelConfig
    from magitrain.parallel_generate import sample_video

    outs = []
    for dp, cp, tp in ((2, 1, 2), (1, 2, 2)):
        cfg = Config(model=ModelConfig(**TINY), parallel=ParallelConfig(dp=dp, cp=cp, tp=tp, cp_chunk_size=4))
        mesh = init_device_mesh("cpu", (dp, cp, tp), mesh_dim_names=("dp", "cp", "tp"))
        mesh["dp", "cp"]._flatten("dp_cp")
        env = ParallelEnv(dist.get_rank(), 4, 0, torch.device("cpu"), dp, cp, tp, mesh)
        model = parallelize_model(make_model(), env, cfg).train()
        forward = model.__dict__.get("forward")
        emb, mask, sc, prefix = _inputs(case)
        outs.append(sample_video(model, emb, mask, H, W, dataclasses.replace(sc), prefix, env, cfg.parallel))
        assert model.training and model.__dict__.get("forward") is forward  # restored for training
    return torch.stack(outs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _spawn(tmp_path_factory, *FAST)


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory):
    return _spawn(tmp_path_factory, LAYOUTS, CASES)


@pytest.fixture(scope="module")
def references():
    model = make_model()
    refs = []
    for case in CASES:
        emb, mask, sc, prefix = _inputs(case)
        sampler = ChunkSampler(model, emb, mask, H, W, sc, prefix)
        refs.append((sampler.generate(), sampler.cache.nbytes() / sampler.cache.num_chunks))
    return refs


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _check_equal(runs, references, layout, cases):
    for i in range(len(cases)):
        ref = references[i][0]
        for rank in range(4):
            got = runs[rank]["{}{}{}_{}".format(*layout, i)]
            assert got.shape == ref.shape
            assert _rel(got, ref) < RTOL, (layout, CASES[i], rank, _rel(got, ref))


@pytest.mark.parametrize("layout", FAST[0], ids=lambda lay: "dp{}_cp{}_tp{}".format(*lay))
def test_parallel_generation_equals_one_process(runs, references, layout):
    """Every rank streams the one-process video (fp32, 1e-5 relative): 2x2 and cp=4, the all-features case."""
    _check_equal(runs, references, layout, FAST[1])


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: "dp{}_cp{}_tp{}".format(*lay))
def test_every_layout_and_window_equals_one_process(all_runs, references, layout):
    """tp=2, cp=2, 2x2 and cp=4, windows 1, 2, 4 (with switches, prefixes, sliding contexts, 1-3 passes)."""
    _check_equal(all_runs, references, layout, CASES)


@pytest.mark.slow
def test_validation_samples_on_the_training_layout(all_runs, references):
    """``sample_video`` (what validation calls) on models parallelized for training, FSDP2 included:
    dp=2 x tp=2 and cp=2 x tp=2, every rank the one-process video."""
    for rank in range(4):
        for got in all_runs[rank]["train_layout"]:
            assert _rel(got, references[0][0]) < RTOL, rank


@pytest.mark.parametrize("layout", FAST[0], ids=lambda lay: "dp{}_cp{}_tp{}".format(*lay))
def test_kv_cache_bytes_divide_by_cp(runs, references, layout):
    """Per-rank cache bytes per cached chunk = one process's / (cp x tp): a chunk's 8 tokens split
    evenly (dispatch-padding slack: at most ceil(T/cp) - T/cp rows per chunk per rank, here 0)."""
    _, cp, tp = layout
    nbytes, chunks = runs[0]["{}{}{}_0_cache".format(*layout)].tolist()
    for rank in range(4):
        nbytes, chunks = runs[rank]["{}{}{}_0_cache".format(*layout)].tolist()
        assert chunks > 0
        assert nbytes / chunks == references[0][1] / (cp * tp), (layout, rank, nbytes / chunks, references[0][1])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"window{c[0]}")
def test_one_rank_fused_batched_sampler_equals_one_process(references, case):
    """No process group: the fused writes, batched guidance passes and the combined-sequence mask
    alone (cp=1) against the one-process sampler; and with separate write forwards."""
    from magitrain.parallel_generate import ParallelChunkSampler

    i = CASES.index(case)
    emb, mask, sc, prefix = _inputs(case)
    model = make_model()
    for fuse in (True, False):
        sampler = ParallelChunkSampler(model, emb, mask, H, W, sc, prefix, chunk_size=3, fuse_writes=fuse)
        assert _rel(sampler.generate(), references[i][0]) < RTOL, fuse
    ticks = sampler.evaluations // sc.passes
    assert sampler.forwards == ticks + sampler.cache.chunks_written  # unfused: one forward per write


# --- the CLI under torchrun: a checkpoint of another layout, loaded without export -------------

def _train_worker(rank, world, port, run_root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from conftest import tiny_config

    from magitrain.train import train

    train(tiny_config(run_root, "train.steps=1", "ckpt.every=1", "parallel.dp=2", "parallel.tp=2",
                      "data.batch_size=2", "parallel.cp_chunk_size=16"))


def _generate_worker(rank, world, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from magitrain.generate import main

    assert main(argv) == 0


GEN_ARGS = ["--prompt", "a red disk moving right", "--prompt-schedule", None, "--chunks", "4", "--steps", "4",
            "--window", "2", "--cfg-scale", "2", "--max-context", "2", "--quiet"]


@pytest.mark.slow
def test_cli_loads_dp2_tp2_checkpoint_into_cp2_run(tmp_path):
    """Train one step at dp=2 x tp=2 (sharded DCP checkpoint), generate from it under torchrun-style
    env at cp=2 and at tp=2 x cp=2 (resharded on load, no export): the latents equal the one-process
    CLI's (which reads the same checkpoint unsharded); rank 0 alone writes the mp4."""
    import numpy as np

    from magitrain.generate import main

    root = str(tmp_path / "train")
    mp.spawn(_train_worker, args=(4, _free_port(), root), nprocs=4)
    run_dir = os.path.join(root, "run")
    schedule = tmp_path / "prompts.txt"
    schedule.write_text("2: a blue square moving left\n")
    args = ["--ckpt", run_dir] + [str(schedule) if a is None else a for a in GEN_ARGS]
    assert main(args + ["--out", str(tmp_path / "one.mp4")]) == 0
    ref = np.load(tmp_path / "one.npy")
    for name, world, layout in (("cp2", 2, ["parallel.cp=2"]), ("tp2cp2", 4, ["parallel.cp=2", "parallel.tp=2"])):
        out = tmp_path / f"{name}.mp4"
        mp.spawn(_generate_worker, args=(world, _free_port(), args + ["--out", str(out)] + layout), nprocs=world)
        got = np.load(tmp_path / f"{name}.npy")
        assert out.stat().st_size > 0
        assert float(np.abs(got - ref).max() / np.abs(ref).max()) < RTOL, name


from test_generate import random_ckpt  # noqa: F401 - the module-scoped checkpoint fixture


def test_cli_overrides_one_process_and_bad_layouts(random_ckpt, tmp_path, capsys):  # noqa: F811
    """``parallel.*`` overrides without torchrun: a 1x1x1 layout runs the parallel sampler (same
    latents as the plain CLI); a layout bigger than the job, dp > 1 or a non-parallel key: exit 2."""
    import numpy as np

    from magitrain.generate import main

    args = ["--ckpt", random_ckpt, "--prompt", "a red disk", "--chunks", "3", "--steps", "2", "--window", "2",
            "--cfg-scale", "2", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a.mp4")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.mp4"), "parallel.cp=1", "parallel.cp_chunk_size=4"]) == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert float(np.abs(a - b).max() / np.abs(a).max()) < RTOL
    capsys.readouterr()
    for bad, says in ((["parallel.tp=2"], "processes"), (["parallel.dp=2"], "parallel.dp=2"),
                      (["model.num_layers=3"], "parallel.* overrides only")):
        assert main(args + ["--out", str(tmp_path / "c.mp4")] + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Traceback" not in err, err


@pytest.mark.parametrize("variant", ["heun", "distilled"])
def test_one_rank_heun_and_distilled_equal_one_process(variant):
    """Heun (two evaluations per step, the write fused into the first) and a step-size conditioned
    model (one pass, the written chunk told step 0) through the parallel sampler's forward."""
    from magitrain.parallel_generate import ParallelChunkSampler

    if variant == "heun":
        model, sc = make_model(), SamplerConfig(steps=4, window=2, solver="heun", cfg_scale=2.0)
    else:
        model = make_model(step_size_conditioning=True, step_size_embedder="zero_init")
        sc = SamplerConfig(steps=4, window=2)
    emb, mask = make_text(4, switches=(2,))
    ref = ChunkSampler(model, emb, mask, H, W, sc).generate()
    assert _rel(ParallelChunkSampler(model, emb, mask, H, W, sc, chunk_size=3).generate(), ref) < RTOL
