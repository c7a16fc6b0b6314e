"""Trained weights from any checkpoint, in one process, one tensor at a time.

A *weight source* is whatever holds one model's parameters, read by name:

- a training checkpoint folder (``state.json`` + DCP ``tensors/``) written under ANY
  dp x cp x tp layout: DCP stores every tensor under its parameter name with its global shape,
  so one process reads each tensor whole, whatever the number of ranks that wrote it. The EMA
  copy (``ema/shadow/<name>``) or the raw weights (``model/<name>``) are picked by the caller;
- an old single-file checkpoint (``state.pt``, read with ``weights_only=True`` and ``mmap``);
- a run directory: its newest complete checkpoint (or ``step=N``);
- a release folder (``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` with
  ``model.safetensors.index.json``, optionally ``*.safetensors.zst``), with ``config.json`` in
  MAGI-1's ``model_config`` form or our ``config.yaml``. Parsed here (header JSON + raw bytes),
  never unpickled, so every file/offset problem is reported with the file name.

Peak memory: each tensor is read on its own (DCP reads only that tensor's byte range; a
safetensors tensor is one seek + read; a ``.zst`` shard is decompressed as a stream in file
order), so a consumer that writes or copies tensors one by one (export, ``load_init_weights``)
holds about one tensor; :func:`load_run_weights` holds the whole model by definition.

Key names: our parameter names ARE MAGI-1's released names (``magitrain/model.py``), so both
release layouts keep them; :func:`check_keys` is the strict comparison (missing, unexpected and
wrong-shaped keys, all listed) used by import, export, verify and ``ckpt.init_from``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from magitrain.checkpoint import (
    MARKER,
    STATE_JSON,
    TENSORS,
    Checkpointer,
    CheckpointError,
    SafeFileSystemReader,
    SafeLoadPlanner,
    read_json,
    verify_checkpoint,
)
from magitrain.checkpoint import _reason as checkpoint_reason
from magitrain.config import Config, ModelConfig, config_from_yaml_text

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAGI1_CONFIG = "config.json"
YAML_CONFIG = "config.yaml"
IMPORTED = "IMPORTED.json"  # provenance file of a checkpoint written by `release import`

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 * 2 ** 20  # safetensors' own limit on the JSON header


class WeightsError(CheckpointError, ValueError):
    """Weights cannot be read or do not fit; the message names the file or the keys. A
    CheckpointError, so the trainer reports a bad ``ckpt.init_from`` in one line (exit 2)."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# ------------------------------------------------------------------------------------------
# Strict key checking
# ------------------------------------------------------------------------------------------

def expected_shapes(model_cfg: ModelConfig) -> dict[str, tuple]:
    """Every parameter name of :class:`MagiDiT` for ``model_cfg`` and its shape (built on meta)."""
    from magitrain.model import MagiDiT

    with torch.device("meta"):
        model = MagiDiT(model_cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_keys(expected: dict[str, tuple], got: dict[str, tuple], where: str) -> None:
    """Raise :class:`WeightsError` unless ``got`` has exactly the keys and shapes of ``expected``;
    the message lists every missing, unexpected and wrong-shaped key (the first few of each)."""
    missing = set(expected) - set(got)
    extra = set(got) - set(expected)
    wrong = [f"{k} {list(got[k])} (expected {list(expected[k])})" for k in sorted(set(got) & set(expected))
             if tuple(got[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s): {_listing(extra)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): " + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))
    if problems:
        raise WeightsError(f"{where} does not match the model: " + "; ".join(problems))


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of the tensor's raw little-endian bytes (what a safetensors file stores)."""
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (contiguous, CPU), without a copy where possible."""
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


# ------------------------------------------------------------------------------------------
# Safetensors files (read side): header JSON + raw bytes, plain or zstd-compressed
# ------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    info: TensorInfo
    begin: int
    end: int


class SafetensorsFile:
    """One ``.safetensors`` (or ``.safetensors.zst``) file: header checked on open (JSON, dtypes,
    offsets inside the file, no holes or overlaps; for plain files the size must match exactly,
    so a truncated file is caught before any tensor is used)."""

    def __init__(self, path: str):
        self.path = path
        self.compressed = path.endswith(".zst")
        if not os.path.isfile(path):
            raise WeightsError(f"{path}: file not found")
        with self._open() as f:
            self.entries, self.metadata, self.data_start = self._parse_header(f)
        if not self.compressed:
            size, end = os.path.getsize(path), self.data_start + max((e.end for e in self.entries.values()), default=0)
            if size < end:
                raise WeightsError(f"{path}: truncated ({size} bytes, the header needs {end})")
            if size > end:
                raise WeightsError(f"{path}: {size - end} bytes after the last tensor (not a safetensors file?)")

    def _open(self):
        if not self.compressed:
            return open(self.path, "rb")
        try:
            import zstandard
        except ImportError:
            raise WeightsError(f"{self.path}: reading .safetensors.zst needs the 'zstandard' package "
                               "(pip install 'magitrain[release]')") from None
        raw = open(self.path, "rb")
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)

    def _read_exact(self, f, n: int) -> bytes:
        try:
            data = f.read(n)
            while len(data) < n:
                more = f.read(n - len(data))
                if not more:
                    break
                data += more
        except Exception as e:  # zstd frame errors
            raise WeightsError(f"{self.path}: cannot be read ({type(e).__name__}: {e})") from None
        if len(data) != n:
            raise WeightsError(f"{self.path}: truncated (file ends {n - len(data)} bytes early)")
        return data

    def _parse_header(self, f):
        n = int.from_bytes(self._read_exact(f, 8), "little")
        if not 2 <= n <= MAX_HEADER:
            raise WeightsError(f"{self.path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(self._read_exact(f, n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        entries, spans = {}, []
        for name, h in header.items():
            try:
                dtype, shape, (begin, end) = ST_DTYPES[h["dtype"]], tuple(int(s) for s in h["shape"]), h["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise WeightsError(f"{self.path}: tensor '{name}' has a bad header entry {h!r}") from None
            info = TensorInfo(shape, dtype)
            if end - begin != info.nbytes:
                raise WeightsError(f"{self.path}: tensor '{name}' {list(shape)} {h['dtype']} needs {info.nbytes} bytes, "
                                   f"its offsets give {end - begin}")
            entries[name] = _Entry(info, begin, end)
            spans.append((begin, end, name))
        pos = 0
        for begin, end, name in sorted(spans):
            if begin != pos:
                raise WeightsError(f"{self.path}: tensor '{name}' starts at {begin}, expected {pos} (hole or overlap)")
            pos = end
        return entries, metadata, 8 + n

    def info(self) -> dict[str, TensorInfo]:
        return {k: e.info for k, e in self.entries.items()}

    def _tensor(self, name: str, data: bytes) -> torch.Tensor:
        info = self.entries[name].info
        if not data:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(bytearray(data), dtype=info.dtype).reshape(info.shape)

    def read(self, name: str) -> torch.Tensor:
        """One tensor (a seek and a read; a ``.zst`` file is decompressed up to it)."""
        if name not in self.entries:
            raise WeightsError(f"{self.path}: has no tensor '{name}'")
        if self.compressed:
            for k, t in self.items([name]):
                return t
        e = self.entries[name]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + e.begin)
            return self._tensor(name, self._read_exact(f, e.end - e.begin))

    def items(self, names=None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` in file order (a stream: a compressed file is read once), optionally
        only ``names``."""
        order = sorted(self.entries, key=lambda k: self.entries[k].begin)
        wanted = set(order if names is None else names)
        with self._open() as f:
            self._read_exact(f, self.data_start)  # header, already parsed
            for name in order:
                e = self.entries[name]
                data = self._read_exact(f, e.end - e.begin)
                if name in wanted:
                    yield name, self._tensor(name, data)


# ------------------------------------------------------------------------------------------
# Weight sources
# ------------------------------------------------------------------------------------------

class WeightSource:
    """One model's named tensors, read one at a time. ``info`` (name -> shape, dtype) is known
    before any data is read; ``which`` says what they are: ``ema``, ``raw`` or ``release``."""

    path: str
    config: Config
    which: str
    step: int | None
    trainer: dict  # the checkpoint's trainer counters (step, tokens_seen, ...), {} if unknown
    imported_from: str | None = None  # the release a weights-only checkpoint was imported from
    info: dict[str, TensorInfo]

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor once, in the cheapest order for the format."""
        for name in self.info:
            yield name, self.read(name)

    def check_against_config(self) -> None:
        check_keys(expected_shapes(self.config.model), {k: v.shape for k, v in self.info.items()}, self.path)


class _CachedReader(SafeFileSystemReader):
    """Reads (and safely unpickles) DCP's ``.metadata`` once, not once per tensor."""

    _metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class DCPSource(WeightSource):
    """A sharded training checkpoint; ``ema``: True (required), False (raw) or None (EMA if any)."""

    def __init__(self, path: str, ema: bool | None):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self._dcp = dcp
        self.path = path
        verify_checkpoint(path)
        saved = read_json(os.path.join(path, STATE_JSON), WeightsError)["state"]
        self.which, tree = _pick_weights(saved, path, ema, shadow=lambda s: s.get("shadow"))
        self.config = _checkpoint_config(path)
        self.trainer = saved.get("trainer") or {}
        self.step = int(self.trainer["step"]) if "step" in self.trainer else _marker_step(path)
        imported = os.path.join(path, IMPORTED)
        self.imported_from = read_json(imported, WeightsError).get("source") if os.path.exists(imported) else None
        self._reader = _CachedReader(os.path.join(path, TENSORS))
        metadata = self._reader.read_metadata().state_dict_metadata
        self._keys, self.info = {}, {}
        for name, leaf in tree.items():
            key = leaf.get("__tensor__") if isinstance(leaf, dict) else None
            md = metadata.get(key)
            if not isinstance(md, TensorStorageMetadata):
                raise WeightsError(f"{path}: '{name}' has no tensor data in {TENSORS}/ (key {key!r})")
            self._keys[name] = key
            self.info[name] = TensorInfo(tuple(md.size), md.properties.dtype)

    def read(self, name: str) -> torch.Tensor:
        info = self.info[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
                self._dcp.load({self._keys[name]: out}, storage_reader=self._reader, planner=SafeLoadPlanner(),
                               no_dist=True)
        except (Exception, self._dcp.CheckpointException) as e:  # noqa: BLE001 - DCP wraps I/O and unpickling errors
            raise WeightsError(f"{self.path}: cannot read '{name}' ({_reason(e)})") from None
        return out


class LegacySource(WeightSource):
    """An old single-file ``state.pt`` checkpoint (``weights_only=True``, memory-mapped)."""

    def __init__(self, path: str, ema: bool | None):
        self.path = path
        file = os.path.join(path, "state.pt")
        try:
            blob = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - truncated or foreign file
            raise WeightsError(f"{file}: cannot be loaded ({type(e).__name__}: {e})") from None
        self.which, self._tensors = _pick_weights(blob, path, ema, shadow=lambda s: s.get("shadow"))
        self.config = _checkpoint_config(path)
        self.trainer = dict(blob.get("trainer") or {})
        self.step = int(self.trainer["step"]) if "step" in self.trainer else _marker_step(path)
        self.info = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].clone()


class SafetensorsSource(WeightSource):
    """A release folder: index + shards, or one file; ``.zst`` shards when zstandard is present."""

    def __init__(self, path: str, config: Config | None = None, check_sha256: bool = True):
        self.path, self.which, self.trainer = path, "release", {}
        self.check_sha256 = check_sha256  # False: the caller compares the digests itself (release verify)
        self.files = _release_files(path)
        self.config = config if config is not None else release_config(path)
        self.step = None
        self._where, self.info = {}, {}
        for file in self.files.values():
            for name, info in file.info().items():
                if name in self._where:
                    raise WeightsError(f"{path}: tensor '{name}' is stored twice ({self._where[name].path} and {file.path})")
                self._where[name], self.info[name] = file, info
        index = os.path.join(path, INDEX)
        self._sha256 = {}  # the index's SHA-256 per tensor, checked on every read
        if os.path.exists(index):
            doc = read_json(index, WeightsError)
            self._sha256 = (doc.get("metadata") or {}).get("sha256") or {}
            weight_map = doc.get("weight_map", {})
            named = {k: self._where[k].path for k in self._where}
            unlisted = set(named) - set(weight_map)
            if unlisted:
                raise WeightsError(f"{index}: does not list {len(unlisted)} tensor(s) found in the shards: {_listing(unlisted)}")
            for k, f in weight_map.items():
                if k not in named:
                    raise WeightsError(f"{index}: tensor '{k}' should be in {f}, which does not hold it")
                if _shard_stem(os.path.basename(named[k])) != _shard_stem(f):
                    raise WeightsError(f"{index}: tensor '{k}' is listed in {f} but stored in {named[k]}")

    def read(self, name: str) -> torch.Tensor:
        return self._checked(name, self._where[name].read(name))

    def items(self):
        for file in self.files.values():
            for name, t in file.items():
                yield name, self._checked(name, t)

    def _checked(self, name: str, t: torch.Tensor) -> torch.Tensor:
        want = self._sha256.get(name) if self.check_sha256 else None
        if want is not None and tensor_sha256(t) != want:
            raise WeightsError(f"{self._where[name].path}: tensor '{name}' is damaged (SHA-256 differs from "
                               f"{INDEX}; data changed since export)")
        return t


def _shard_stem(name: str) -> str:
    return name.removesuffix(".zst")


def _release_files(path: str) -> dict[str, SafetensorsFile]:
    """The shard files of a release folder, by name (index order), each header-checked."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        doc = read_json(index, WeightsError)
        if not isinstance(doc.get("weight_map"), dict) or not doc["weight_map"]:
            raise WeightsError(f"{index}: no weight_map")
        names = list(dict.fromkeys(doc["weight_map"].values()))
    else:
        names = [n for n in (SINGLE, SINGLE + ".zst") if os.path.exists(os.path.join(path, n))][:1]
        if not names:
            raise WeightsError(f"{path}: no {INDEX} and no {SINGLE}")
    files = {}
    for name in names:
        full = os.path.join(path, name)
        if not os.path.exists(full) and os.path.exists(full + ".zst"):
            full += ".zst"  # MAGI-1 ships shards compressed under the index's names
        if not os.path.exists(full):
            raise WeightsError(f"{index}: shard {name} is missing from {path}")
        files[name] = SafetensorsFile(full)
    return files


def _pick_weights(state: dict, path: str, ema: bool | None, shadow):
    """``(which, tensor tree)`` from a checkpoint's state: the EMA copy or the raw model."""
    has_ema = isinstance(state.get("ema"), dict) and isinstance(shadow(state["ema"]), dict)
    if ema and not has_ema:
        raise WeightsError(f"{path}: EMA weights requested, but the checkpoint has none (optim.ema_decay=0?)")
    if has_ema and ema is not False:
        return "ema", shadow(state["ema"])
    if not isinstance(state.get("model"), dict):
        raise WeightsError(f"{path}: checkpoint has no model weights")
    return "raw", state["model"]


def _checkpoint_config(path: str) -> Config:
    for candidate in (os.path.join(path, YAML_CONFIG), os.path.join(path, "..", "..", YAML_CONFIG)):
        if os.path.exists(candidate):
            with open(candidate) as f:
                return config_from_yaml_text(f.read())
    raise WeightsError(f"{path}: no {YAML_CONFIG} (cannot tell the model's shape)")


def _marker_step(path: str) -> int | None:
    try:
        return Checkpointer.step_of(path)
    except (OSError, ValueError, KeyError):
        return None


def _reason(e: BaseException) -> str:
    return checkpoint_reason(e)


# ------------------------------------------------------------------------------------------
# MAGI-1 config.json <-> our ModelConfig
# ------------------------------------------------------------------------------------------

# ModelConfig fields MAGI-1's model_config has no key for (its code hard-codes them or keeps
# them in the inference pipeline); a magi1 release stores them in a "magitrain" section.
EXTRA_FIELDS = ("null_caption_tokens", "gate_softcap", "rope_ref_grid", "init_std", "sink_chunks", "max_context_chunks")
MAGI1_FIXED = {"gate_softcap": 1.0, "rope_ref_grid": 16}  # what MAGI-1's code hard-codes


def magi1_config(m: ModelConfig, dtype: torch.dtype) -> dict:
    """MAGI-1's config JSON (``model_config`` + the runtime/engine keys we know) for ``m``; the
    inverse of :func:`magitrain.model.config_from_magi1` (+ :func:`model_config_from_json`)."""
    bad = [f"model.{k}={getattr(m, k)} (MAGI-1 uses {v})" for k, v in MAGI1_FIXED.items() if getattr(m, k) != v]
    if bad:
        raise WeightsError("MAGI-1's code cannot run this model: " + ", ".join(bad) + "; export with --format magitrain")
    model_config = {
        "model_name": "videodit_ardf", "num_layers": m.num_layers, "hidden_size": m.hidden_size,
        "ffn_hidden_size": m.ffn_hidden_size, "num_attention_heads": m.num_heads, "num_query_groups": m.num_kv_heads,
        "kv_channels": m.head_dim, "layernorm_epsilon": m.layernorm_eps, "apply_layernorm_1p": True,
        "x_rescale_factor": m.x_rescale_factor, "half_channel_vae": m.half_channel_vae,
        "params_dtype": str(dtype), "patch_size": m.patch_size, "t_patch_size": m.t_patch_size,
        "in_channels": m.in_channels, "out_channels": m.out_channels, "cond_hidden_ratio": m.cond_hidden_ratio,
        "caption_channels": m.caption_channels, "caption_max_length": m.caption_max_length,
        "xattn_cond_hidden_ratio": m.xattn_cond_hidden_ratio, "cond_gating_ratio": m.cond_gating_ratio,
        "gated_linear_unit": m.gated_linear_unit}
    return {"model_config": model_config,
            "runtime_config": {"chunk_width": m.chunk_frames},
            "engine_config": {"distill": m.step_size_conditioning, "fp8_quant": False},
            "magitrain": {k: getattr(m, k) for k in EXTRA_FIELDS}}


def model_config_from_json(doc: dict, where: str) -> ModelConfig:
    """Our ModelConfig from a MAGI-1 config JSON (its example configs or our magi1 export)."""
    from magitrain.model import config_from_magi1

    if not isinstance(doc.get("model_config"), dict):
        raise WeightsError(f"{where}: no 'model_config' section (not a MAGI-1 config)")
    overrides = {k: v for k, v in (doc.get("magitrain") or {}).items() if k in EXTRA_FIELDS}
    runtime, engine = doc.get("runtime_config") or {}, doc.get("engine_config") or {}
    if "chunk_width" in runtime:
        overrides["chunk_frames"] = int(runtime["chunk_width"])
    if engine.get("fp8_quant"):
        raise WeightsError(f"{where}: fp8-quantised MAGI-1 checkpoints are not supported (use a bf16 one)")
    overrides["step_size_conditioning"] = bool(engine.get("distill", False))
    try:
        return config_from_magi1(doc["model_config"], **overrides)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{where}: {e}") from None


def config_from_file(path: str) -> Config:
    """A full Config from our YAML, or a default Config whose model comes from a MAGI-1 JSON."""
    if path.endswith((".yaml", ".yml")):
        with open(path) as f:
            return config_from_yaml_text(f.read())
    return Config(model=model_config_from_json(read_json(path, WeightsError), path))


def release_config(path: str) -> Config:
    """The config stored in a release folder (``config.yaml`` wins: it holds the whole config)."""
    for name in (YAML_CONFIG, MAGI1_CONFIG):
        if os.path.exists(os.path.join(path, name)):
            return config_from_file(os.path.join(path, name))
    raise WeightsError(f"{path}: no {YAML_CONFIG} or {MAGI1_CONFIG} (MAGI-1's HF folders keep it elsewhere: "
                       "pass --config, e.g. MAGI-1's example/4.5B/4.5B_base_config.json)")


# ------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------

def resolve_checkpoint(path: str, step: int | None = None) -> str:
    """A checkpoint folder from a run dir (newest complete, or ``step``) or a checkpoint folder."""
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file or directory")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        ck = Checkpointer(path)
        if step is not None:
            folder = ck.path_for(step)
            if not os.path.exists(os.path.join(folder, MARKER)):
                have = [s for s, _ in ck.complete_checkpoints()]
                raise WeightsError(f"{path}: no complete checkpoint at step {step} (complete: {have or 'none'})")
            return folder
        latest = ck.latest()
        if latest is None:
            raise WeightsError(f"{path}: no complete checkpoint under checkpoints/")
        return latest
    if not os.path.exists(os.path.join(path, MARKER)):
        raise WeightsError(f"{path}: not a run directory or a complete checkpoint folder (no {MARKER} marker)")
    if step is not None and _marker_step(path) != step:
        raise WeightsError(f"{path}: is the checkpoint of step {_marker_step(path)}, not {step}")
    return path


def is_release(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in (INDEX, SINGLE, SINGLE + ".zst"))


def open_weights(path: str, ema: bool | None = None, step: int | None = None) -> WeightSource:
    """The weight source at ``path`` (run dir, checkpoint folder or release folder).
    ``ema``: True = the EMA copy (error if none), False = raw weights, None = EMA when present."""
    if is_release(path):
        if step is not None:
            raise WeightsError(f"{path}: a release folder has one set of weights (no --step)")
        return SafetensorsSource(path)
    folder = resolve_checkpoint(path, step)
    if os.path.isdir(os.path.join(folder, TENSORS)):
        return DCPSource(folder, ema)
    if os.path.exists(os.path.join(folder, "state.pt")):
        return LegacySource(folder, ema)
    raise WeightsError(f"{folder}: no {TENSORS}/ and no state.pt (not a checkpoint folder)")


def load_run_weights(path: str, prefer_ema: bool = True) -> tuple[Config, dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of the model at ``path`` (run dir, checkpoint folder of any layout,
    or release folder), read in one process and checked strictly against the config. EMA weights
    when ``prefer_ema`` and present, else the raw weights."""
    src = open_weights(path, ema=None if prefer_ema else False)
    src.check_against_config()
    return src.config, dict(src.items())


@torch.no_grad()
def load_init_weights(model: torch.nn.Module, path: str) -> WeightSource:
    """Copy the weights at ``path`` into an unsharded ``model`` (strict: every key, every shape),
    one tensor at a time, converting dtype. Training checkpoints give their EMA weights when they
    have them (what a release of that run would hold). Returns the source, for logging."""
    src = open_weights(path)
    params = model.state_dict(keep_vars=True)
    check_keys({k: tuple(v.shape) for k, v in params.items()}, {k: v.shape for k, v in src.info.items()}, path)
    for name, t in src.items():
        params[name].copy_(t)
    return src


def is_weights_only(checkpoint: str) -> bool:
    """A checkpoint without optimizer state (written by ``release import``): it starts a run."""
    try:
        with open(os.path.join(checkpoint, STATE_JSON)) as f:
            return "optim" not in json.load(f)["state"]
    except (OSError, ValueError, KeyError):
        return False


def resolve_init(cfg: Config, resume: str | None = None) -> str | None:
    """What the trainer loads as initial weights: ``ckpt.init_from``, or the checkpoint that
    ``ckpt.resume`` names when it is weights-only (an imported release), unless the run has a
    full checkpoint to resume (then resuming wins and nothing is loaded here). ``resume``: the
    checkpoint ``ckpt.resume`` resolved to (the trainer resolves and verifies it once), else resolved here."""
    if resume is None and cfg.ckpt.resume:
        try:
            resume = Checkpointer(cfg.run.dir).resolve(cfg.ckpt.resume, log=lambda m: None)
        except CheckpointError:
            resume = None  # the trainer reports a bad resume path itself
    if resume and is_weights_only(resume):
        return resume
    if resume:
        return None
    return cfg.ckpt.init_from or None


__all__ = [
    "SafetensorsFile",
    "TensorInfo",
    "WeightSource",
    "WeightsError",
    "check_keys",
    "config_from_file",
    "expected_shapes",
    "is_release",
    "load_init_weights",
    "load_run_weights",
    "magi1_config",
    "model_config_from_json",
    "open_weights",
    "release_config",
    "resolve_init",
    "tensor_sha256",
]
