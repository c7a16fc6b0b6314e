"""Release conversion: ``python -m magitrain.release {export,import,verify} ...``.

- ``export RUN_DIR OUT_DIR [--step N] [--ema|--raw] [--dtype bf16|fp32] [--format magi1|magitrain]
  [--max-shard-size 5GB]``: one process reads a training checkpoint of any dp x cp x tp layout
  (:mod:`magitrain.weights`), tensor by tensor, and writes ``model-0000k-of-0000n.safetensors``
  (or ``model.safetensors`` when everything fits in one shard) + ``model.safetensors.index.json``
  (``weight_map``, total size, and a SHA-256 per tensor), the config (``magi1``: MAGI-1's
  ``config.json``; ``magitrain``: our ``config.yaml``) and a model card ``README.md``. The folder
  is written beside OUT_DIR and renamed into place at the end: it is complete or absent.
- ``export --lora RUN_DIR OUT_DIR``: a LoRA run's adapter alone: ``adapter_model.safetensors`` (keys
  ``base_model.model.<MAGI-1 module>.lora_A.weight`` / ``.lora_B.weight``, PEFT's saved layout, fp32 by
  default), PEFT's ``adapter_config.json`` and ``magitrain_adapter.json`` (the base's path and digest,
  step, a SHA-256 per tensor). ``export --merge RUN_DIR OUT_DIR [...]``: full weights with each adapter
  folded in (``W + alpha/rank B A`` in fp32, then ``--dtype``), read from the base the checkpoint
  names (refused if its digest changed); any other export of a LoRA run is refused with a hint.
- ``import SRC_DIR RUN_DIR [--config FILE]``: a MAGI-1-layout release (index + shards, or one
  file; ``.safetensors.zst`` with the ``zstandard`` package) -> a weights-only training
  checkpoint ``RUN_DIR/checkpoints/step_00000000`` that ``ckpt.init_from=RUN_DIR`` or
  ``ckpt.resume`` starts a new run from (new optimizer, step 0), in any layout. Strict: a
  missing, unexpected or wrong-shaped key is an error that lists them.
- ``verify OUT_DIR [--config FILE]``: index vs files, shapes vs config, dtypes, finite values,
  stored checksums; prints a SHA-256 per tensor.

Key layouts: our parameter names are MAGI-1's released names (``videodit_blocks.layers.{i}...``),
so ``magi1`` and ``magitrain`` releases hold the same keys; they differ in config form and
default dtype (``magi1``: bf16 like MAGI-1's weights; ``magitrain``: fp32, for more training).
Only safetensors and JSON/YAML are written or read here; nothing is unpickled (a training
checkpoint's DCP index is read by the allow-list unpickler of :mod:`magitrain.checkpoint`).
Errors: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable

import torch

from magitrain.checkpoint import Checkpointer, CheckpointError, read_json
from magitrain.config import ConfigError, save_config, shard_specs, to_yaml
from magitrain.weights import (
    IMPORTED,
    INDEX,
    MAGI1_CONFIG,
    SINGLE,
    ST_NAMES,
    YAML_CONFIG,
    SafetensorsSource,
    TensorInfo,
    WeightsError,
    WeightSource,
    check_keys,
    config_from_file,
    expected_shapes,
    magi1_config,
    open_weights,
    release_config,
    tensor_bytes,
    tensor_sha256,
)

FORMATS = ("magi1", "magitrain")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_DTYPE = {"magi1": "bf16", "magitrain": "fp32"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``5GB`` -> 5e9 bytes, ``512MiB`` -> 512 * 2**20, ``1000`` -> 1000 (HF's convention)."""
    m = _SIZE.match(str(text))
    if not m:
        raise WeightsError(f"--max-shard-size={text!r}: expected a size like 5GB, 500MB or 2GiB")
    power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
    size = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
    if size <= 0:
        raise WeightsError(f"--max-shard-size={text!r} must be positive")
    return size


# ------------------------------------------------------------------------------------------
# Writing safetensors files, one tensor at a time
# ------------------------------------------------------------------------------------------

def plan_shards(info: dict[str, TensorInfo], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of names, each at most ``max_bytes`` of data (a bigger tensor alone)."""
    shards, size = [[]], 0
    for name, ti in info.items():
        if shards[-1] and size + ti.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += ti.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    return [SINGLE] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def plan_index(info: dict[str, TensorInfo], max_bytes: int, fmt: str) -> dict:
    """The index a release of tensors ``info`` would get (no data needed: meta models work)."""
    shards = plan_shards(info, max_bytes)
    names = shard_file_names(len(shards))
    weight_map = {k: f for f, group in zip(names, shards) for k in group}
    dtypes = sorted({str(ti.dtype).replace("torch.", "") for ti in info.values()})
    return {"metadata": {"total_size": sum(ti.nbytes for ti in info.values()), "format": fmt, "dtype": ",".join(dtypes)},
            "weight_map": weight_map}


def safetensors_header(info: dict[str, TensorInfo], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header for tensors stored back to back in ``info`` order."""
    header, offset = {"__metadata__": metadata}, 0
    for name, ti in info.items():
        header[name] = {"dtype": ST_NAMES[ti.dtype], "shape": list(ti.shape), "data_offsets": [offset, offset + ti.nbytes]}
        offset += ti.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return len(body).to_bytes(8, "little") + body


def write_safetensors(path: str, info: dict[str, TensorInfo], read: Callable[[str], torch.Tensor],
                      metadata: dict[str, str]) -> dict[str, str]:
    """Write one safetensors file, reading and converting one tensor at a time; -> SHA-256 per tensor."""
    sums = {}
    with open(path, "wb") as f:
        f.write(safetensors_header(info, metadata))
        for name, ti in info.items():
            t = read(name).to(ti.dtype)
            if tuple(t.shape) != ti.shape:
                raise WeightsError(f"'{name}' read as {list(t.shape)}, its metadata says {list(ti.shape)}")
            data = tensor_bytes(t)
            f.write(data)
            sums[name] = hashlib.sha256(data).hexdigest()
            del t, data
    return sums


# ------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------

def export(src_path: str, out_dir: str, *, step: int | None = None, ema: bool | None = None,
           dtype: str | None = None, fmt: str = "magi1", max_shard_size: int | str = "5GB",
           log: Callable[[str], None] = print, merge: bool = False) -> dict:
    """Export the weights at ``src_path`` (run dir or checkpoint folder) as a release in ``out_dir``;
    returns a summary (files, tensors, bytes, seconds). ``merge``: a LoRA run's adapters folded into
    the base weights its checkpoint names (:class:`MergedLoraSource`)."""
    if fmt not in FORMATS:
        raise WeightsError(f"--format={fmt!r}: choose one of {', '.join(FORMATS)}")
    dtype = dtype or DEFAULT_DTYPE[fmt]
    if dtype not in DTYPES:
        raise WeightsError(f"--dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise WeightsError(f"{out_dir}: already exists and is not an empty folder")
    t0 = time.perf_counter()
    src = open_weights(src_path, ema=ema, step=step)
    if merge:
        src = MergedLoraSource(src)
    elif src.config.model.lora.rank:
        raise WeightsError(f"{src.path}: a LoRA checkpoint holds only the adapters; export with --lora (the adapter) "
                           "or --merge (full weights with the adapter folded in)")
    order = expected_shapes(src.config.model)
    check_keys(order, {k: v.shape for k, v in src.info.items()}, src.path)
    target = DTYPES[dtype]
    info = {k: TensorInfo(src.info[k].shape, target if src.info[k].dtype.is_floating_point else src.info[k].dtype)
            for k in order}
    config_files = ({MAGI1_CONFIG: json.dumps(magi1_config(src.config.model, target), indent=2) + "\n"} if fmt == "magi1"
                    else {YAML_CONFIG: to_yaml(src.config)})
    index = plan_index(info, max_bytes, fmt)
    files = list(dict.fromkeys(index["weight_map"].values()))

    tmp = os.path.abspath(out_dir).rstrip("/") + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        sums = {}
        for file in files:
            part = {k: info[k] for k, f in index["weight_map"].items() if f == file}
            sums.update(write_safetensors(os.path.join(tmp, file), part, src.read, {"format": "pt"}))
        index["metadata"]["sha256"] = sums
        _write_text(os.path.join(tmp, INDEX), json.dumps(index, indent=2) + "\n")
        for name, text in config_files.items():
            _write_text(os.path.join(tmp, name), text)
        _write_text(os.path.join(tmp, "README.md"), model_card(src, fmt, dtype, index, files))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    nbytes = index["metadata"]["total_size"]
    log(f"exported {len(info)} tensors ({_params(info):,} parameters, {nbytes / 1e6:.1f} MB {dtype}, "
        f"{src.which} weights of step {src.step}) from {src.path} to {out_dir} as {fmt}: {len(files)} file(s), "
        f"{seconds:.1f} s ({nbytes / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
    return {"files": files, "tensors": len(info), "bytes": nbytes, "seconds": seconds, "which": src.which,
            "step": src.step}


def _params(info: dict[str, TensorInfo]) -> int:
    return sum(math.prod(ti.shape) for ti in info.values())


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def model_card(src: WeightSource, fmt: str, dtype: str, index: dict, files: list[str]) -> str:
    """A short README.md: what the weights are, the training config, step and data summary."""
    cfg, m, d = src.config, src.config.model, src.config.data
    params = sum(math.prod(src.info[k].shape) for k in index["weight_map"])
    tokens = src.trainer.get("tokens_seen")
    what = {"ema": f"EMA of the weights (decay {cfg.optim.ema_decay})", "raw": "raw (non-EMA) weights",
            "release": "weights of an imported release"}[src.which]
    if src.imported_from:
        what = f"imported unchanged from the release `{src.imported_from}` (not trained by magitrain)"
    if isinstance(src, MergedLoraSource):
        lo = src.lora_config
        what = (f"the base `{src.base.path}` with the LoRA adapter (rank {lo.rank}, alpha {lo.alpha}, "
                f"{what.split(' (')[0].lower()}) folded in")
    if d.curriculum:
        data = "; ".join(f"{s.name}: until step {s.until_step or 'end'}, seq_tokens {s.seq_tokens or d.seq_tokens}"
                         f"{', shards ' + ' + '.join(shard_specs(s.shards)) if s.shards else ''}" for s in d.curriculum)
    else:
        data = f"one stage, seq_tokens {d.seq_tokens}"
    shards = " + ".join(shard_specs(d.shards)) or ("synthetic clips of " f"{d.frames}x{d.height}x{d.width} latents" if d.source == "synthetic" else "-")
    config_file = MAGI1_CONFIG if fmt == "magi1" else YAML_CONFIG
    trained = not src.imported_from and src.which != "release"
    lines = [
        f"# MAGI-1-style video DiT, {params / 1e6:,.1f}M parameters (magitrain export)",
        "",
        f"- **Weights**: {what}, training step {src.step}"
        + (f", {int(tokens):,} training tokens seen" if tokens else "") + f"; exported from `{src.path}`.",
        f"- **Format**: `{fmt}` key layout (MAGI-1's released parameter names), {dtype}, "
        f"{len(files)} safetensors file(s) + `{INDEX}` (SHA-256 per tensor); config in `{config_file}`.",
        f"- **Model**: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads ({m.num_kv_heads} KV) x "
        f"{m.head_dim}, FFN {m.ffn_hidden_size} ({'SwiGLU' if m.gated_linear_unit else 'GELU'}), "
        f"{m.in_channels} latent channels, patch {m.t_patch_size}x{m.patch_size}x{m.patch_size}, "
        f"chunk {m.chunk_frames} latent frames, captions {m.caption_max_length} x {m.caption_channels}"
        + (", step-size conditioned (distilled)" if m.step_size_conditioning else "") + ".",
    ] + ([] if not trained else [
        f"- **Data**: source `{d.source}` ({shards}); {data}; buckets {d.buckets or 'as stored'}; "
        f"image ratio {d.image_ratio}; {d.batch_size} packed sequences per step.",
        f"- **Training**: {cfg.train.steps} steps planned, lr {cfg.optim.lr} (warmup {cfg.optim.warmup_steps}), "
        f"{cfg.train.dtype}, layout dp {cfg.parallel.dp} x cp {cfg.parallel.cp} x tp {cfg.parallel.tp}; "
        f"flow matching, t=0 noise, t=1 clean (MAGI-1's convention), velocity prediction."]) + [
        "",
        "Check the files with `python -m magitrain.release verify <this folder>`; fine-tune with "
        "`python -m magitrain.release import <this folder> RUN_DIR` and `ckpt.init_from=RUN_DIR`, or load "
        "directly with `magitrain.weights.load_run_weights(<this folder>)`.",
        "",
        "## Training config" if trained else "## Config",
        "",
        "```yaml",
        to_yaml(cfg).rstrip(),
        "```",
        ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# LoRA: the adapter alone (PEFT's layout), or merged into the base
# ------------------------------------------------------------------------------------------

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_PROVENANCE = "magitrain_adapter.json"  # the base (path, digest), step, targets, a SHA-256 per tensor
PEFT_PREFIX = "base_model.model."  # PEFT saves adapter keys under its wrapper's names


def _lora_parts(src: WeightSource) -> tuple[dict, dict]:
    """``(adapter tensor infos by name, the checkpoint's lora_base entry)`` of a LoRA checkpoint."""
    from magitrain.lora import is_adapter_key

    if not src.config.model.lora.rank:
        raise WeightsError(f"{src.path}: not a LoRA run (model.lora.rank=0); export it without --lora/--merge")
    base = read_json(os.path.join(src.path, "state.json"), WeightsError)["state"].get("lora_base")
    if not isinstance(base, dict) or "path" not in base:
        raise WeightsError(f"{src.path}: LoRA checkpoint without its base reference (lora_base)")
    names = {k: v for k, v in src.info.items() if is_adapter_key(k)}
    if not names or len(names) != len(src.info):
        raise WeightsError(f"{src.path}: expected only lora_A/lora_B tensors, got {len(src.info)} tensors, "
                           f"{len(names)} adapter tensors")
    return names, base


class MergedLoraSource(WeightSource):
    """Full weights of a LoRA run: each base tensor (read from the base the checkpoint names, whose
    digest must still match) with ``alpha / rank * B @ A`` added in fp32 where an adapter exists."""

    def __init__(self, lora_src: WeightSource):
        from magitrain.lora import base_name
        from magitrain.lora_base import base_fingerprint

        adapters, ref = _lora_parts(lora_src)
        now = base_fingerprint(ref["path"])
        if now["sha256"] != ref.get("sha256"):
            raise WeightsError(f"{ref['path']}: the base changed since training (sha256 {now['sha256'][:16]}..., "
                               f"the checkpoint recorded {str(ref.get('sha256'))[:16]}...)")
        self.lora, self.base = lora_src, open_weights(ref["path"])
        self.base.check_against_config()
        import copy

        self.path, self.which, self.step = lora_src.path, lora_src.which, lora_src.step
        self.config = copy.deepcopy(lora_src.config)  # what the merged weights are: a plain model
        self.config.model.lora.rank = 0
        self.trainer, self.imported_from = lora_src.trainer, None
        self.info = dict(self.base.info)
        lo = lora_src.config.model.lora
        self.lora_config = lo
        self.scale = lo.alpha / lo.rank
        self.pairs = {}
        for key in adapters:
            target = base_name(key)
            if target not in self.info:
                raise WeightsError(f"{lora_src.path}: adapter '{key}' has no base weight '{target}'")
            self.pairs.setdefault(target, {})[key.rsplit(".", 2)[1]] = key

    def read(self, name: str) -> torch.Tensor:
        from magitrain.lora import merged_weight

        w = self.base.read(name)
        pair = self.pairs.get(name)
        if pair is None:
            return w
        return merged_weight(w, self.lora.read(pair["lora_A"]), self.lora.read(pair["lora_B"]), self.scale)


def export_lora(src_path: str, out_dir: str, *, step: int | None = None, ema: bool | None = None,
                dtype: str = "fp32", log: Callable[[str], None] = print) -> dict:
    """Write a LoRA run's adapter as ``adapter_model.safetensors`` (keys ``base_model.model.<MAGI-1 module>
    .lora_A.weight`` / ``.lora_B.weight``, PEFT's saved layout) + ``adapter_config.json`` (PEFT's LoraConfig)."""
    from magitrain.lora import TARGETS, target_names

    if dtype not in DTYPES:
        raise WeightsError(f"--dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise WeightsError(f"{out_dir}: already exists and is not an empty folder")
    src = open_weights(src_path, ema=ema, step=step)
    adapters, base = _lora_parts(src)
    lo = src.config.model.lora
    target = DTYPES[dtype]
    info = {PEFT_PREFIX + k: TensorInfo(v.shape, target) for k, v in adapters.items()}
    config = {"peft_type": "LORA", "task_type": None, "r": lo.rank, "lora_alpha": lo.alpha, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              "target_modules": sorted(target_names(src.config.model.num_layers, lo.targets)),
              "base_model_name_or_path": base["path"], "revision": None}
    ours = {"base": base, "targets": list(lo.targets), "step": src.step, "weights": src.which,
            "adaptable": list(TARGETS), "module": "magitrain.model.MagiDiT",
            "note": "linear_proj is read as a weight by MagiDiT: load with magitrain.lora (or --merge), not by "
                    "wrapping MagiDiT in peft, for its adapter to apply"}
    tmp = os.path.abspath(out_dir).rstrip("/") + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        sums = write_safetensors(os.path.join(tmp, ADAPTER_FILE), info, lambda k: src.read(k[len(PEFT_PREFIX):]),
                                 {"format": "pt"})
        ours["sha256"] = sums
        _write_text(os.path.join(tmp, ADAPTER_CONFIG), json.dumps(config, indent=2) + "\n")
        _write_text(os.path.join(tmp, ADAPTER_PROVENANCE), json.dumps(ours, indent=2) + "\n")
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported the LoRA adapter ({len(info)} tensors, {_params(info):,} parameters, rank {lo.rank}, alpha "
        f"{lo.alpha}, {src.which} weights of step {src.step}) from {src.path} to {out_dir}; base: {base['path']}")
    return {"files": [ADAPTER_FILE, ADAPTER_CONFIG, ADAPTER_PROVENANCE], "tensors": len(info), "step": src.step}


# ------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------

def import_release(src_dir: str, run_dir: str, config: str | None = None,
                   log: Callable[[str], None] = print) -> str:
    """Write the release at ``src_dir`` as the weights-only checkpoint ``RUN_DIR/checkpoints/step_00000000``
    (tensors kept in their stored dtype; the trainer converts). Returns the checkpoint folder."""
    t0 = time.perf_counter()
    cfg = config_from_file(config) if config else release_config(src_dir)
    cfg.run.dir = run_dir
    src = SafetensorsSource(src_dir, cfg)
    src.check_against_config()
    ck = Checkpointer(run_dir, keep_last=1)
    if ck.complete_checkpoints():
        raise WeightsError(f"{run_dir}: already holds checkpoints; import into a new run directory")
    tensors = dict(src.items())  # DCP writes one state dict: the model is held once, in its stored dtype
    provenance = {"source": os.path.abspath(src_dir), "files": [os.path.basename(f.path) for f in src.files.values()],
                  "tensors": len(tensors), "time": time.time()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
        path = ck.save(0, {"model": tensors, "trainer": {"step": 0, "tokens_seen": 0}}, to_yaml(cfg),
                       extra_files={IMPORTED: json.dumps(provenance, indent=2).encode()})
    save_config(cfg, os.path.join(run_dir, YAML_CONFIG))
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    seconds = time.perf_counter() - t0
    log(f"imported {len(tensors)} tensors ({nbytes / 1e6:.1f} MB) from {src_dir} into {path} in {seconds:.1f} s "
        f"({nbytes / 1e6 / max(seconds, 1e-9):.0f} MB/s); start training with ckpt.init_from={run_dir}")
    return path


# ------------------------------------------------------------------------------------------
# Verify
# ------------------------------------------------------------------------------------------

def verify(path: str, config: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Check a release folder; prints ``sha256  name dtype shape`` per tensor. Raises on a problem."""
    cfg = config_from_file(config) if config else release_config(path)
    src = SafetensorsSource(path, cfg, check_sha256=False)  # headers, truncation, index vs files; digests below
    listed = {os.path.basename(f.path) for f in src.files.values()}
    stray = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".safetensors.zst")) and n not in listed)
    if stray:
        raise WeightsError(f"{path}: shard file(s) not named by the index: {', '.join(stray)}")
    src.check_against_config()
    float_dtypes = {ti.dtype for ti in src.info.values() if ti.dtype.is_floating_point}
    if len(float_dtypes) > 1:
        raise WeightsError(f"{path}: mixed float dtypes {sorted(map(str, float_dtypes))}")
    magi1 = os.path.join(path, MAGI1_CONFIG)
    if os.path.exists(magi1) and float_dtypes:
        declared = read_json(magi1, WeightsError)["model_config"].get("params_dtype")
        if declared and declared != str(next(iter(float_dtypes))):
            raise WeightsError(f"{magi1}: params_dtype {declared}, but the tensors are {next(iter(float_dtypes))}")
    stored = {}
    if os.path.exists(os.path.join(path, INDEX)):
        stored = (read_json(os.path.join(path, INDEX), WeightsError).get("metadata") or {}).get("sha256") or {}
    bad, nonfinite = [], []
    for name, t in src.items():
        digest = tensor_sha256(t)
        if name in stored and stored[name] != digest:
            bad.append(name)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nonfinite.append(name)
        log(f"{digest}  {name} {str(t.dtype).replace('torch.', '')} {list(t.shape)}")
    if bad:
        raise WeightsError(f"{path}: checksum mismatch (data changed since export) for {len(bad)} tensor(s): "
                           + ", ".join(bad[:8]))
    if nonfinite:
        raise WeightsError(f"{path}: non-finite values in {len(nonfinite)} tensor(s): " + ", ".join(nonfinite[:8]))
    params = _params(src.info)
    log(f"OK: {len(src.info)} tensors, {params:,} parameters, {len(src.files)} file(s), dtype "
        f"{','.join(sorted(str(d).replace('torch.', '') for d in float_dtypes))}, "
        f"checksums {'match the index' if stored else 'printed (none stored)'}")
    return {"tensors": len(src.info), "params": params, "files": len(src.files), "checksums_checked": bool(stored)}


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m magitrain.release", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="training checkpoint -> release folder")
    e.add_argument("run_dir", help="run directory (newest complete checkpoint) or checkpoint folder")
    e.add_argument("out_dir")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    which = e.add_mutually_exclusive_group()
    which.add_argument("--ema", dest="ema", action="store_true", default=None, help="EMA weights (error if none)")
    which.add_argument("--raw", dest="ema", action="store_false", help="raw weights (default: EMA when present)")
    e.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 for magi1, fp32 for magitrain")
    e.add_argument("--format", dest="fmt", choices=FORMATS, default="magi1")
    e.add_argument("--max-shard-size", default="5GB")
    adapter = e.add_mutually_exclusive_group()
    adapter.add_argument("--lora", action="store_true", help="a LoRA run: write the adapter alone "
                         "(adapter_model.safetensors + adapter_config.json, PEFT's layout)")
    adapter.add_argument("--merge", action="store_true", help="a LoRA run: write full weights with the adapter "
                         "folded in (W + alpha/rank B A), read from the base the checkpoint names")
    i = sub.add_parser("import", help="MAGI-1-layout release -> weights-only training checkpoint")
    i.add_argument("src_dir")
    i.add_argument("run_dir")
    i.add_argument("--config", default=None, help="MAGI-1 config JSON or our YAML (default: the one in SRC_DIR)")
    v = sub.add_parser("verify", help="check a release folder and print a checksum per tensor")
    v.add_argument("out_dir")
    v.add_argument("--config", default=None, help="config to check shapes against (default: the one in OUT_DIR)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed its message
        return int(e.code or 0)
    try:
        if args.cmd == "export" and args.lora:
            export_lora(args.run_dir, args.out_dir, step=args.step, ema=args.ema, dtype=args.dtype or "fp32")
        elif args.cmd == "export":
            export(args.run_dir, args.out_dir, step=args.step, ema=args.ema, dtype=args.dtype, fmt=args.fmt,
                   max_shard_size=args.max_shard_size, merge=args.merge)
        elif args.cmd == "import":
            import_release(args.src_dir, args.run_dir, args.config)
        else:
            verify(args.out_dir, args.config)
    except (WeightsError, CheckpointError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
