"""Release conversion (magitrain.release, magitrain.weights): export / import / verify and
``ckpt.init_from``.

References are independent of the code under test: trained weights are read back with
``Checkpointer.load`` (DCP's own whole-checkpoint load), release files are written and read
with the ``safetensors`` library, MAGI-1's key list is pinned in ``tests/data``, and MAGI-1's
own outputs come from the shared tiny reference folder.
"""

import json
import math
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import REPO, SHARED, tiny_config
from safetensors.torch import load_file, save_file

from magitrain.checkpoint import Checkpointer
from magitrain.config import load_config
from magitrain.data import build_data_source
from magitrain.model import MagiDiT
from magitrain.release import export, import_release, main, plan_index, verify
from magitrain.weights import (
    INDEX,
    TensorInfo,
    WeightsError,
    load_init_weights,
    load_run_weights,
    magi1_config,
    model_config_from_json,
)

REF = os.path.join(SHARED, "data", "magi1_tiny_reference")
KEYS_PIN = os.path.join(REPO, "tests", "data", "magi1_4.5b_keys.json")
TRAIN = ["train.steps=2", "optim.ema_decay=0.5", "optim.warmup_steps=1", "ckpt.every=0"]


def quiet(*_):
    pass


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------

def fixed_batch_output(cfg, state: dict, model_cfg=None) -> torch.Tensor:
    """The velocity of a ``model_cfg`` (default ``cfg.model``) model on one fixed synthetic batch of
    ``cfg``'s data (fp32, eval)."""
    model = MagiDiT(model_cfg or cfg.model)
    model.load_state_dict(state, strict=True)
    batch = build_data_source(cfg, 0, 1).next_batch()
    t = torch.linspace(0.1, 0.9, batch.layout.num_chunks)
    with torch.no_grad():
        return model.eval()(batch.latents, t, batch.text_emb, batch.text_mask, batch.layout)


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def check_round_trip(run_dir: str, tmp: str):
    """Export (magi1 + magitrain, EMA + raw), import, forward: bitwise equal to the trained weights."""
    ckpt = Checkpointer(run_dir).latest()
    trained = Checkpointer.load(ckpt)
    ema, raw = trained["ema"]["shadow"], trained["model"]
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # so picking the wrong one fails
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    want_ema, want_raw = fixed_batch_output(cfg, ema), fixed_batch_output(cfg, raw)
    assert not torch.equal(want_ema, want_raw)

    # magi1 layout, default = EMA, fp32 -> import into a fresh run -> single-process forward
    out = export(run_dir, f"{tmp}/magi1", dtype="fp32", max_shard_size="40KB", log=quiet)
    assert out["which"] == "ema" and len(out["files"]) > 1
    verify(f"{tmp}/magi1", log=quiet)
    import_release(f"{tmp}/magi1", f"{tmp}/imported", log=quiet)
    cfg2, weights = load_run_weights(f"{tmp}/imported")
    assert cfg2.model == cfg.model
    assert_same_tensors(weights, ema)
    assert torch.equal(fixed_batch_output(cfg, weights, cfg2.model), want_ema)

    # magitrain layout, raw weights: loads directly and through import
    export(run_dir, f"{tmp}/mt_raw", ema=False, fmt="magitrain", log=quiet)
    for path in (f"{tmp}/mt_raw", import_release(f"{tmp}/mt_raw", f"{tmp}/imported_raw", log=quiet)):
        cfg3, weights = load_run_weights(path)
        assert cfg3 == cfg or path != f"{tmp}/mt_raw"
        assert torch.equal(fixed_batch_output(cfg, weights, cfg3.model), want_raw)

    # bf16 is the magi1 default; --ema explicitly is the same tensors
    export(run_dir, f"{tmp}/bf16", ema=True, log=quiet)
    got = {}
    for f in sorted(os.listdir(f"{tmp}/bf16")):
        if f.endswith(".safetensors"):
            got.update(load_file(f"{tmp}/bf16/{f}"))
    assert_same_tensors(got, {k: v.to(torch.bfloat16) for k, v in ema.items()})


# ------------------------------------------------------------------------------------------
# Round trip from training (single process; CP=2 x TP=2 below, slow)
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from magitrain.train import train

    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tmp, *TRAIN)
    train(cfg)
    return cfg.run.dir


def test_round_trip_single_process(trained_run, tmp_path):
    check_round_trip(trained_run, str(tmp_path))


def test_init_from_and_resume_of_an_import_start_a_new_run(trained_run, tmp_path):
    from magitrain.train import train

    export(trained_run, f"{tmp_path}/rel", dtype="fp32", log=quiet)
    imported = f"{tmp_path}/imported"
    import_release(f"{tmp_path}/rel", imported, log=quiet)
    ema = Checkpointer.load(Checkpointer(trained_run).latest())["ema"]["shadow"]
    frozen = ["train.steps=1", "optim.lr=0", "optim.ema_decay=0"]  # lr 0: the step leaves the weights as loaded
    for run in (tiny_config(tmp_path / "a", *frozen, f"ckpt.init_from={imported}"),
                tiny_config(tmp_path / "b", *frozen, f"run.dir={imported}", "ckpt.resume=auto")):
        train(run)
        saved = Checkpointer.load(Checkpointer(run.run.dir).latest())
        assert saved["trainer"]["step"] == 1  # a new run: step 0 -> 1
        assert_same_tensors(saved["model"], ema)

    # a model of another shape: a clear error listing the keys
    bad = tiny_config(tmp_path / "c", *frozen, f"ckpt.init_from={imported}", "model.num_layers=3")
    model = MagiDiT(bad.model)
    with pytest.raises(WeightsError, match=r"missing key\(s\): videodit_blocks\.layers\.2\."):
        load_init_weights(model, imported)


def test_export_errors(trained_run, tmp_path, capsys):
    with pytest.raises(WeightsError, match=r"no complete checkpoint at step 1 \(complete: \[2\]\)"):
        export(trained_run, f"{tmp_path}/x", step=1, log=quiet)
    os.makedirs(f"{tmp_path}/full")
    open(f"{tmp_path}/full/junk", "w").close()
    assert main(["export", trained_run, f"{tmp_path}/full"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    noema = tiny_config(tmp_path / "noema", "train.steps=1", "optim.ema_decay=0")
    from magitrain.train import train
    train(noema)
    with pytest.raises(WeightsError, match="EMA weights requested"):
        export(noema.run.dir, f"{tmp_path}/y", ema=True, log=quiet)
    assert export(noema.run.dir, f"{tmp_path}/y", log=quiet)["which"] == "raw"  # default: EMA when present


def _cp_tp_worker(rank, world, port, run_root):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from magitrain.train import train
    train(tiny_config(run_root, *TRAIN, "parallel.cp=2", "parallel.tp=2", "parallel.cp_chunk_size=16"))


@pytest.mark.slow
def test_round_trip_from_cp2_tp2(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_cp_tp_worker, args=(4, port, str(tmp_path / "cp2tp2")), nprocs=4)
    check_round_trip(str(tmp_path / "cp2tp2" / "run"), str(tmp_path))


# ------------------------------------------------------------------------------------------
# MAGI-1: released key list, tiny reference
# ------------------------------------------------------------------------------------------

def _pinned_keys() -> dict:
    with open(KEYS_PIN) as f:
        pin = json.load(f)
    keys = dict(pin["global"])
    for i in range(pin["num_layers"]):
        keys.update({f"videodit_blocks.layers.{i}.{k}": v for k, v in pin["per_layer"].items()})
    assert len(keys) == pin["num_tensors"] and sum(math.prod(v) for v in keys.values()) == pin["num_params"]
    return keys


def test_pinned_key_list_is_magi1s():
    full = os.path.join(SHARED, "docs", "magi1_keys", "4.5B.json")
    if not os.path.exists(full):
        pytest.skip("shared MAGI-1 key lists not present")
    with open(full) as f:
        assert _pinned_keys() == json.load(f)


def test_magi1_4p5b_export_index_matches_released_keys():
    cfg = load_config(os.path.join(REPO, "configs", "magi1_4.5b.yaml"))
    with torch.device("meta"):
        model = MagiDiT(cfg.model)
    info = {k: TensorInfo(tuple(v.shape), torch.bfloat16) for k, v in model.state_dict().items()}
    index = plan_index(info, 5 * 10 ** 9, "magi1")
    expected = _pinned_keys()
    assert set(index["weight_map"]) == set(expected)
    assert {k: list(v.shape) for k, v in info.items()} == expected
    # like MAGI-1's 4.5B release: bf16 in two 5 GB shards
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    assert index["metadata"]["total_size"] == 2 * 4_459_898_128
    doc = magi1_config(cfg.model, torch.bfloat16)
    mc = doc["model_config"]
    assert (mc["num_layers"], mc["hidden_size"], mc["num_attention_heads"], mc["num_query_groups"],
            mc["kv_channels"], mc["ffn_hidden_size"], mc["params_dtype"]) == (34, 3072, 24, 8, 128, 12288,
                                                                              "torch.bfloat16")
    assert model_config_from_json(doc, "x") == cfg.model  # config.json round trip


@pytest.fixture(scope="module")
def reference_import(tmp_path_factory):
    if not os.path.isdir(REF):
        pytest.skip("MAGI-1 tiny reference data not present")
    tmp = tmp_path_factory.mktemp("ref")
    shutil.copy(os.path.join(REF, "weights.safetensors"), tmp / "model.safetensors")
    shutil.copy(os.path.join(REF, "config.json"), tmp / "config.json")
    import_release(str(tmp), str(tmp / "run"), log=quiet)
    return tmp


def test_magi1_reference_import_forward_and_export_bitwise(reference_import, tmp_path):
    from test_magi1_reference import REL_TOL, _call

    cfg, weights = load_run_weights(str(reference_import / "run"))
    model = MagiDiT(cfg.model)
    model.load_state_dict(weights, strict=True)
    model.eval()
    for case in ("case1", "case2", "case3", "case4"):
        inputs = load_file(os.path.join(REF, f"{case}_inputs.safetensors"))
        expected = load_file(os.path.join(REF, f"{case}_output.safetensors"))["output"]
        out = _call(model, inputs)
        assert (out - expected).abs().max() <= REL_TOL * expected.abs().max(), case
    export(str(reference_import / "run"), str(tmp_path / "back"), dtype="fp32", log=quiet)
    assert_same_tensors(load_file(str(tmp_path / "back" / "model.safetensors")),
                        load_file(os.path.join(REF, "weights.safetensors")))
    doc = json.loads((tmp_path / "back" / "config.json").read_text())
    with open(os.path.join(REF, "config.json")) as f:
        ref_doc = json.load(f)
    assert {k: doc["model_config"][k] for k in ref_doc["model_config"]} == ref_doc["model_config"]
    verify(str(tmp_path / "back"), log=quiet)


# ------------------------------------------------------------------------------------------
# Release folders written by the safetensors library: sharded, compressed, corrupt
# ------------------------------------------------------------------------------------------

@pytest.fixture
def source(tmp_path):
    """A random tiny model as a MAGI-1-style release: 3 shards + index + config.json."""
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in MagiDiT(cfg.model).state_dict().items()}
    folder = tmp_path / "src"
    write_release(folder, state, cfg.model, shards=3)
    return folder, state, cfg


def write_release(folder, state, model_cfg, shards=1):
    os.makedirs(folder, exist_ok=True)
    names = list(state)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for k, group in enumerate(groups, 1):
        file = "model.safetensors" if shards == 1 else f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in group}, str(folder / file))
        weight_map.update({n: file for n in group})
    if shards > 1:
        (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(magi1_config(model_cfg, torch.float32)))


def test_sharded_and_single_sources_import(source, tmp_path):
    folder, state, cfg = source
    import_release(str(folder), str(tmp_path / "a"), log=quiet)
    assert_same_tensors(load_run_weights(str(tmp_path / "a"))[1], state)
    single = tmp_path / "single"
    write_release(single, state, cfg.model)
    assert_same_tensors(load_run_weights(str(single))[1], state)


def test_zstd_compressed_shards(source, tmp_path):
    zstandard = pytest.importorskip("zstandard")
    folder, state, _ = source
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            data = (folder / name).read_bytes()
            (folder / (name + ".zst")).write_bytes(zstandard.ZstdCompressor().compress(data))
            os.remove(folder / name)
    import_release(str(folder), str(tmp_path / "z"), log=quiet)
    assert_same_tensors(load_run_weights(str(tmp_path / "z"))[1], state)
    shard = next(folder.glob("*.zst"))
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(WeightsError, match=f"{shard.name}.*truncated|{shard.name}.*cannot be read"):
        import_release(str(folder), str(tmp_path / "z2"), log=quiet)


def _expect_import_error(folder, tmp_path, capsys, *patterns):
    assert main(["import", str(folder), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for p in patterns:
        assert p in err, (p, err)
    assert not os.path.exists(tmp_path / "dst" / "checkpoints" / "step_00000000")


def test_truncated_shard(source, tmp_path, capsys):
    folder, _, _ = source
    shard = folder / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    _expect_import_error(folder, tmp_path, capsys, "model-00002-of-00003.safetensors", "truncated")


def test_missing_shard(source, tmp_path, capsys):
    folder, _, _ = source
    os.remove(folder / "model-00003-of-00003.safetensors")
    _expect_import_error(folder, tmp_path, capsys, "model-00003-of-00003.safetensors", "missing")


def test_shape_mismatch_extra_and_missing_keys(source, tmp_path, capsys):
    folder, state, cfg = source
    bad = dict(state)
    bad["rope.bands"] = torch.zeros(3)
    bad["videodit_blocks.layers.0.extra.weight"] = torch.zeros(2)
    del bad["final_linear.linear.weight"]
    shutil.rmtree(folder)
    write_release(folder, bad, cfg.model, shards=2)
    _expect_import_error(folder, tmp_path, capsys, "rope.bands [3] (expected [2])",
                         "unexpected key(s): videodit_blocks.layers.0.extra.weight",
                         "missing key(s): final_linear.linear.weight")


def test_index_naming_a_tensor_not_in_its_shard(source, tmp_path, capsys):
    folder, _, _ = source
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    (folder / INDEX).write_text(json.dumps(index))
    _expect_import_error(folder, tmp_path, capsys, "ghost.weight", "model-00001-of-00003.safetensors")


def test_verify_reports_checksums_and_detects_changes(trained_run, tmp_path, capsys):
    out = tmp_path / "rel"
    export(trained_run, str(out), max_shard_size="30KB", log=quiet)
    assert main(["verify", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("OK:") and "checksums match the index" in lines[-1]
    assert sum(len(line.split()[0]) == 64 for line in lines[:-1]) == len(lines) - 1 > 10
    shard = min(out.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x40  # one bit of the last tensor
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    index = json.loads((out / INDEX).read_text())
    del index["weight_map"][next(iter(index["weight_map"]))]
    (out / INDEX).write_text(json.dumps(index))
    assert main(["verify", str(out)]) == 2
    assert "does not list 1 tensor(s)" in capsys.readouterr().err


def test_legacy_single_file_checkpoint(tmp_path):
    """An old ``state.pt`` checkpoint (weights_only, memory-mapped): EMA preferred, raw on request."""
    from magitrain.config import to_yaml
    from magitrain.weights import open_weights

    cfg = tiny_config(tmp_path)
    raw = {k: torch.randn_like(v) for k, v in MagiDiT(cfg.model).state_dict().items()}
    ema = {k: v * 2 for k, v in raw.items()}
    folder = tmp_path / "step_00000007"
    os.makedirs(folder)
    torch.save({"model": raw, "ema": {"decay": 0.9, "shadow": ema}, "trainer": {"step": 7}}, folder / "state.pt")
    (folder / "config.yaml").write_text(to_yaml(cfg))
    (folder / "COMPLETE").write_text('{"step": 7}')
    assert_same_tensors(load_run_weights(str(folder))[1], ema)
    assert_same_tensors(load_run_weights(str(folder), prefer_ema=False)[1], raw)
    assert open_weights(str(folder)).step == 7


def test_parse_size():
    from magitrain.release import parse_size

    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2GiB") == 2 * 2 ** 30 and parse_size("40kb") == 40_000
    assert parse_size("1000") == 1000
    with pytest.raises(WeightsError, match="--max-shard-size"):
        parse_size("lots")
