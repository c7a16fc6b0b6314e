"""Checkpoints: sharded (DCP), complete-or-absent folders, newest-complete resume, safe loading.

Layout of a run's checkpoints::

    RUN_DIR/checkpoints/step_00000100/
        tensors/          every tensor of the shared state, saved by torch.distributed.checkpoint
                          (DCP): each rank writes its own shards, ``.metadata`` indexes them
        state.json        everything else of the shared state (counters, scheduler, optimizer
                          hyper-parameters, ...) with each tensor leaf as {"__tensor__": key}
        rank_00000.json   per-rank state (data position, RNG), one file per rank
        config.yaml       the resolved config of the run that wrote it
        sha256_00000.json per-rank checksums: SHA-256 and size of every file that rank wrote
        COMPLETE          written last, by rank 0, after every rank finished: a folder without
                          it is ignored by ``resume=auto``; holds the SHA-256 of every rank's
                          checksum file, the run's lineage id and a digest of itself

A checkpoint is written into a hidden temporary folder and renamed into place after its marker
is written, so a crash (or a full disk) mid-save never leaves a half-written checkpoint where
``auto`` would pick it; the previous checkpoints stay untouched.

Resharding: tensors are stored under their fully-qualified names with their global shapes
(FSDP2/TP shards are DTensors), so a checkpoint saved under one dp x cp x tp layout loads under
any other, or on one process, with identical values (DCP reads the overlapping pieces).

Integrity: every rank hashes the files it wrote once, right after writing them (a second read,
from the page cache; DCP's writer offers no hook to hash the stream), into its checksum file.
:func:`verify_checkpoint` checks every file against them before anything is loaded (resume,
init_from, export, generate); ``resume=auto`` falls back from a damaged newest checkpoint to the
previous complete one, naming both. Pruning removes only checkpoints of this run's lineage
(``run_id`` in the marker, inherited on resume).

Safe loading (no arbitrary unpickling): DCP writes tensor data with ``torch.save`` and reads
it with ``torch.load(weights_only=True)``; its ``.metadata`` index is a pickle, which we read
with an unpickler that builds only an exact list of classes (DCP's metadata dataclasses,
``torch.Size``, dtypes, paths; no modules, no dotted names: :class:`SafeFileSystemReader`), and
the load planner refuses DCP's pickled "bytes" entries (:class:`SafeLoadPlanner`). We never store non-tensor objects in DCP (DCP would
``torch.load(weights_only=False)`` them): those go to JSON. Old single-file ``state.pt``
checkpoints still load with ``weights_only=True``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from magitrain.parallel import collectives
from magitrain.parallel.tensor_parallel import checkpoint_layout

MARKER = "COMPLETE"
TENSORS = "tensors"
STATE_JSON = "state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TENSOR = "__tensor__"
_INLINE = "__inline_tensor__"
CHECKSUMS = "sha256_{rank:05d}.json"
_CHECKSUM_FILE = re.compile(r"^sha256_(\d{5})\.json$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the path."""


# ------------------------------------------------------------------------------------------
# Safe reading of DCP metadata
# ------------------------------------------------------------------------------------------

_METADATA_CLASSES = ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                     "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
_TORCH_VALUES = tuple(n for n in dir(torch) if isinstance(getattr(torch, n, None), (torch.dtype, torch.memory_format)))


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP's ``.metadata`` legitimately holds: an exact list of (module, name)
    pairs, each a class or value (no module objects, no dotted names, no functions but
    ``torch.serialization._get_layout``, which maps a layout name to ``torch.strided`` etc.)."""

    _ALLOWED = frozenset({("torch.distributed.checkpoint.metadata", n) for n in _METADATA_CLASSES}
                         | {("torch", n) for n in _TORCH_VALUES}
                         | {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                            ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                            ("pathlib", "PureWindowsPath")})

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from checkpoint metadata")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, except that a "bytes" entry (DCP would ``torch.load(weights_only=False)``
    it) is refused: our checkpoints never store one."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"refusing to unpickle the non-tensor entry '{read_item.dest_index.fqn}' of a checkpoint")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with the metadata read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = os.path.join(str(self.path), ".metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except Exception as e:  # noqa: BLE001 - refused names, truncation, bad arguments to an allowed class
            raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ------------------------------------------------------------------------------------------
# State trees: tensors (to DCP) and JSON (everything else)
# ------------------------------------------------------------------------------------------

def _as_tree(state: dict) -> dict:
    return {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()}


def split_tree(tree, path: tuple = ()) -> tuple[object, dict]:
    """``(json_tree, tensors)``: tensors keyed by their '/'-joined path, leaves replaced by markers."""
    if isinstance(tree, torch.Tensor):
        key = "/".join(path)
        return {_TENSOR: key}, {key: tree}
    if isinstance(tree, dict):
        out, tensors = {}, {}
        for k, v in tree.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"cannot store state key {k!r} at {'/'.join(path)} (str or int only)")
            out[str(k)], t = split_tree(v, path + (str(k),))
            tensors.update(t)
        return out, tensors
    if isinstance(tree, (list, tuple)):
        parts = [split_tree(v, path + (str(i),)) for i, v in enumerate(tree)]
        return [p[0] for p in parts], {k: t for p in parts for k, t in p[1].items()}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree, {}
    raise CheckpointError(f"cannot store a {type(tree).__name__} at {'/'.join(path)} in a checkpoint")


def merge_tree(saved, template, path: tuple = (), tensors: dict | None = None):
    """Rebuild the state from JSON ``saved``; tensor leaves come from ``tensors`` (by key) or, with
    a ``template``, are the template's tensors (to be filled in place by DCP)."""
    where = "/".join(path) or "<root>"
    if isinstance(saved, dict) and set(saved) == {_TENSOR}:
        key = saved[_TENSOR]
        if tensors is not None:
            return tensors[key]
        if not isinstance(template, torch.Tensor):
            raise CheckpointError(f"checkpoint holds a tensor at {where}; the current state does not")
        return template
    if isinstance(template, torch.Tensor):
        raise CheckpointError(f"checkpoint lacks the tensor {where}")
    if isinstance(saved, dict):
        tmpl = {str(k): (k, v) for k, v in template.items()} if isinstance(template, dict) else {}
        if tensors is None:
            missing = [k for k, (_, v) in tmpl.items() if k not in saved and _has_tensor(v)]
            if missing:
                raise CheckpointError(f"checkpoint lacks {where}/{missing[0]}")
        return {tmpl.get(k, (k, None))[0]: merge_tree(v, tmpl.get(k, (k, None))[1], path + (k,), tensors)
                for k, v in saved.items()}
    if isinstance(saved, list):
        tmpl = list(template) if isinstance(template, (list, tuple)) else [None] * len(saved)
        tmpl += [None] * (len(saved) - len(tmpl))
        out = [merge_tree(v, t, path + (str(i),), tensors) for i, (v, t) in enumerate(zip(saved, tmpl))]
        return tuple(out) if isinstance(template, tuple) else out
    return saved


def _has_tensor(tree) -> bool:
    if isinstance(tree, torch.Tensor):
        return True
    if isinstance(tree, dict):
        return any(_has_tensor(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_has_tensor(v) for v in tree)
    return False


def _inline_tensors(tree):
    """Per-rank state is tiny: tensors go inline as raw bytes (base64), never pickled."""
    if isinstance(tree, torch.Tensor):
        arr = tree.detach().cpu().contiguous().numpy()
        return {_INLINE: base64.b64encode(arr.tobytes()).decode(), "dtype": str(arr.dtype), "shape": list(arr.shape)}
    if isinstance(tree, dict):
        return {str(k): _inline_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_inline_tensors(v) for v in tree]
    return tree


def _uninline_tensors(tree):
    if isinstance(tree, dict) and _INLINE in tree:
        arr = np.frombuffer(base64.b64decode(tree[_INLINE]), dtype=np.dtype(tree["dtype"])).reshape(tree["shape"])
        return torch.from_numpy(arr.copy())
    if isinstance(tree, dict):
        return {k: _uninline_tensors(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_uninline_tensors(v) for v in tree]
    return tree


def read_json(path: str, error: type[Exception] = None):
    """A JSON file, or ``error`` (default :class:`CheckpointError`) naming the path."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise (error or CheckpointError)(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


# ------------------------------------------------------------------------------------------
# Stateful adapters for model and optimizer (sharding-aware, FQN-keyed)
# ------------------------------------------------------------------------------------------

class ModelState:
    """The model's state dict by parameter name, sharded as the model is (FSDP2/TP DTensors).
    ``trainable_only``: only parameters with ``requires_grad`` (a LoRA run's adapters; the frozen base
    is referenced, not stored: see :class:`magitrain.lora_base.BaseReference`)."""

    def __init__(self, model: torch.nn.Module, trainable_only: bool = False):
        self.model, self.trainable_only = model, trainable_only

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(ignore_frozen_params=True, strict=False) if self.trainable_only else None

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self.model, options=self._options())

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(self.model, state, options=self._options())


class OptimizerState:
    """The optimizer's state keyed by parameter name (not position), so it reshards."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        set_optimizer_state_dict(self.model, self.optimizer, state)


class RNGState:
    """This process's torch CPU (and current CUDA device) generator state."""

    def state_dict(self) -> dict:
        out = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = torch.cuda.get_rng_state()
        return out

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"].to(torch.uint8))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"].to(torch.uint8))


# ------------------------------------------------------------------------------------------
# The checkpointer
# ------------------------------------------------------------------------------------------

def _dist() -> tuple[int, int]:
    return collectives.rank_and_world()


def _barrier() -> None:
    collectives.barrier()


def _all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (so all ranks fail a save together); a CPU-side
    agreement, so on the CPU group (a device group under NCCL refuses the CPU flag)."""
    return collectives.every_rank(ok)


def _dcp_group(name: str = collectives.CPU):
    """The group DCP plans and agrees over: a CPU group (its plans travel as pickled CPU tensors);
    None on a plain process (``no_dist``)."""
    return collectives.cpu_group(name) if collectives.initialized() else None


def all_ranks_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (the trainer's run-dir agreement)."""
    return _all_ok(ok)


# ------------------------------------------------------------------------------------------
# Checksums
# ------------------------------------------------------------------------------------------

def sha256_file(path: str, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _files_of_rank(folder: str, rank: int) -> list[str]:
    """The files (relative paths) rank ``rank`` wrote into a checkpoint folder being completed."""
    tensors = os.path.join(folder, TENSORS)
    mine = [f"rank_{rank:05d}.json"] + [f"{TENSORS}/{n}" for n in sorted(os.listdir(tensors))
                                         if n.startswith(f"__{rank}_")]
    if rank == 0:
        skip = set(mine) | {MARKER}
        for root, _, names in os.walk(folder):
            for n in names:
                rel = os.path.relpath(os.path.join(root, n), folder)
                other_rank = re.fullmatch(r"rank_\d{5}\.json", rel) or (rel.startswith(f"{TENSORS}/__")
                                                                         and rel.endswith(".distcp"))
                if rel not in skip and not _CHECKSUM_FILE.match(rel) and not other_rank:
                    mine.append(rel)
    return sorted(mine)


def _write_checksums(folder: str, rank: int) -> None:
    files = {rel: {"sha256": sha256_file(os.path.join(folder, rel)), "bytes": os.path.getsize(os.path.join(folder, rel))}
             for rel in _files_of_rank(folder, rank)}
    _write_json(os.path.join(folder, CHECKSUMS.format(rank=rank)), {"files": files})


def _marker_digest(marker: dict) -> str:
    body = {k: v for k, v in marker.items() if k != "marker_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


_VERIFIED: set = set()  # (folder, marker mtime) verified in this process


def verify_checkpoint(path: str, share: tuple[int, int] = (0, 1)) -> bool:
    """Check every file of the checkpoint folder against its checksums (this ``(rank, world)``
    share of the files); raises :class:`CheckpointError` naming the first bad file. Returns False
    for a checkpoint written before checksums existed (nothing to check), True when verified."""
    marker_path = os.path.join(path, MARKER)
    try:
        key = (os.path.abspath(path), os.stat(marker_path).st_mtime_ns, share)
    except OSError as e:
        raise CheckpointError(f"{marker_path}: cannot be read ({e.strerror})") from None
    if key in _VERIFIED:
        return True
    marker = read_json(marker_path)
    if not isinstance(marker, dict) or "step" not in marker:
        raise CheckpointError(f"{marker_path}: damaged (not a checkpoint marker)")
    if "checksums" not in marker:
        return False  # an older checkpoint: no checksums were written
    if marker.get("marker_sha256") != _marker_digest(marker):
        raise CheckpointError(f"{marker_path}: damaged (its digest does not match its content)")
    files: dict[str, dict] = {}
    for name, digest in sorted(marker["checksums"].items()):
        full = os.path.join(path, name)
        if not os.path.exists(full):
            raise CheckpointError(f"{full}: missing (the checkpoint's marker lists it)")
        if sha256_file(full) != digest:
            raise CheckpointError(f"{full}: damaged (SHA-256 differs from the one in {MARKER})")
        files.update(read_json(full)["files"])
    rank, world = share
    for i, (rel, want) in enumerate(sorted(files.items())):
        if i % world != rank:
            continue
        full = os.path.join(path, rel)
        if not os.path.exists(full):
            raise CheckpointError(f"{full}: missing from the checkpoint")
        size = os.path.getsize(full)
        if size != want["bytes"]:
            raise CheckpointError(f"{full}: damaged ({size} bytes, {want['bytes']} when written)")
        if sha256_file(full) != want["sha256"]:
            raise CheckpointError(f"{full}: damaged (SHA-256 differs from the one written at save)")
    _VERIFIED.add(key)
    return True


class Checkpointer:
    """Saves and finds checkpoints under ``run_dir/checkpoints``, keeping the last ``keep_last``.

    ``save`` and ``load_into`` are collective when torch.distributed is initialized: every rank
    calls them with its own (sharded) state. Host-side agreement and DCP's planning run on the
    CPU group (:mod:`magitrain.parallel.collectives`), never on a device group.

    ``async_save`` (when torch.distributed runs): tensors are staged to host memory in ``save``,
    then a background thread writes them, planning over its own CPU group ("checkpoint": gloo
    must not be driven from two threads on one group). The checkpoint is completed (marker,
    rename, prune) by :meth:`poll` at the first step boundary where every rank's write is done,
    or at the next ``save`` / :meth:`wait`. Until then it is a hidden temp folder: a crash
    during the write leaves the previous checkpoint the newest complete one.
    """

    def __init__(self, run_dir: str, keep_last: int = 3, async_save: bool = False, verify: bool = True,
                 run_id: str | None = None):
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep_last = keep_last
        self.async_save = async_save
        self.verify = verify
        self.run_id = run_id  # lineage: pruning removes only checkpoints with this id in their marker
        self._pending = None  # (future, tmp, final, step)

    def path_for(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:08d}")

    def complete_checkpoints(self) -> list[tuple[int, str]]:
        """``(step, path)`` of every complete checkpoint, oldest first."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            m = _STEP_DIR.match(name)
            path = os.path.join(self.root, name)
            if m and os.path.exists(os.path.join(path, MARKER)):
                found.append((int(m.group(1)), path))
        return sorted(found)

    def latest(self) -> str | None:
        done = self.complete_checkpoints()
        return done[-1][1] if done else None

    def resolve(self, resume: str, log=print) -> str | None:
        """``''`` -> None (fresh run); ``auto`` -> newest complete and intact checkpoint (a damaged
        newest one is skipped with a warning naming both) or None; else a checked path (collective
        when torch.distributed is initialized: the ranks share the checksum work)."""
        if not resume:
            return None
        if resume == "auto":
            damaged = []
            for _, path in reversed(self.complete_checkpoints()):
                reason = self._damage(path)
                if reason is None:
                    if damaged:
                        log(f"warning: checkpoint {damaged[0][0]} is damaged ({damaged[0][1]}); resuming from "
                            f"the previous complete checkpoint {path}")
                    return path
                damaged.append((path, reason))
            if damaged:
                raise CheckpointError(f"ckpt.resume=auto: every complete checkpoint is damaged; newest: {damaged[0][1]}")
            return None
        path = resume
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, MARKER)):
            # a run dir: take its newest checkpoint
            inner = Checkpointer(path).latest()
            if inner is None:
                raise CheckpointError(f"ckpt.resume={resume}: no complete checkpoint there (no {MARKER} marker)")
            path = inner
        if not os.path.exists(os.path.join(path, MARKER)):
            raise CheckpointError(f"ckpt.resume={resume}: not a complete checkpoint folder")
        reason = self._damage(path)
        if reason is not None:
            raise CheckpointError(f"ckpt.resume={resume}: {reason}")
        return path

    def _damage(self, path: str) -> str | None:
        """Why the checkpoint at ``path`` is damaged (agreed by every rank), or None."""
        if not self.verify:
            return None
        rank, world = _dist()
        reason = None
        try:
            verify_checkpoint(path, (rank, world))
        except CheckpointError as e:
            reason = str(e)
        if _all_ok(reason is None):
            return None
        return reason or f"{path}: damaged (found by another rank, see its message)"

    @staticmethod
    def marker(path: str) -> dict:
        """The checkpoint's marker (step, world size, run_id, checksums); {} if unreadable."""
        try:
            with open(os.path.join(path, MARKER)) as f:
                out = json.load(f)
            return out if isinstance(out, dict) else {}
        except (OSError, ValueError):
            return {}

    # --- saving ---------------------------------------------------------------------------

    def save(self, step: int, state: dict, config_yaml: str, extra_files: dict[str, bytes] | None = None,
             per_rank: dict | None = None, layout: dict | None = None) -> str:
        """Write ``state`` (objects with ``state_dict()``, or trees of tensors and plain values; the
        same names on every rank, tensors possibly sharded) and this rank's ``per_rank`` state.
        ``layout`` (``{"dp", "cp", "tp"}`` of the run) is recorded so a resume under another layout
        hands every rank the per-rank state of its own data-parallel rank.
        Returns the checkpoint folder (complete on return unless ``async_save``)."""
        self.wait()
        rank, world = _dist()
        final = self.path_for(step)
        tmp = os.path.join(self.root, f".tmp_step_{step:08d}")
        future, error = None, None
        try:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            _barrier()
            saved, tensors = split_tree(_as_tree(state))
            tensors = {k: checkpoint_layout(v) for k, v in tensors.items()}  # DCP-writable shards, same values
            _write_json(os.path.join(tmp, f"rank_{rank:05d}.json"), _inline_tensors(_as_tree(per_rank or {})))
            if rank == 0:
                _write_json(os.path.join(tmp, STATE_JSON), {"world_size": world, "state": saved,
                                                            **({"layout": dict(layout)} if layout else {})})
                with open(os.path.join(tmp, "config.yaml"), "w") as f:
                    f.write(config_yaml)
                for name, data in (extra_files or {}).items():
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(data)
            writer = dcp.FileSystemWriter(os.path.join(tmp, TENSORS))
            if self.async_save and collectives.initialized():
                # staged to host memory here, written by a background thread over its own CPU group
                future = dcp.async_save(tensors, storage_writer=writer, process_group=_dcp_group(collectives.CHECKPOINT))
            else:
                group = _dcp_group()
                dcp.save(tensors, storage_writer=writer, process_group=group, no_dist=group is None)
        except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - becomes a CheckpointError naming the folder
            error = e
        if self.async_save and collectives.initialized():
            # every rank must have started its write, or none goes pending: the ranks then fail together
            if _all_ok(error is None):
                self._pending = (future, tmp, final, step)
                return final
            # a started write waits in vain for the missing peers and fails on its own after
            # parallel.timeout_s; not waiting for it keeps every rank's next collectives in step
            error = error or CheckpointError("another rank could not start its write")
        return self._complete(tmp, final, step, error)

    def poll(self) -> None:
        """Complete a pending asynchronous save once its write finished on every rank (collective:
        every rank calls it at the same step; it communicates only while a save is pending)."""
        if self._pending is not None and collectives.every_rank(self._pending[0].done()):
            self.wait()

    def wait(self) -> None:
        """Finish a pending asynchronous save (collective)."""
        if self._pending is None:
            return
        future, tmp, final, step = self._pending
        self._pending = None
        error = None
        try:
            future.result()
        except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001
            error = e
        self._complete(tmp, final, step, error)

    def _complete(self, tmp: str, final: str, step: int, error: Exception | None) -> str:
        """All ranks finished writing: each hashes its files, then rank 0 writes the marker last and
        renames into place."""
        rank, world = _dist()
        if error is None:
            try:
                _write_checksums(tmp, rank)
            except OSError as e:
                error = e
        if _all_ok(error is None) and rank == 0:
            try:
                sums = {CHECKSUMS.format(rank=r): sha256_file(os.path.join(tmp, CHECKSUMS.format(rank=r)))
                        for r in range(world)}
                marker = {"step": step, "time": time.time(), "world_size": world, "format": "dcp",
                          "run_id": self.run_id, "checksums": sums}
                marker["marker_sha256"] = _marker_digest(marker)
                with open(os.path.join(tmp, MARKER), "w") as f:
                    json.dump(marker, f)
                    f.flush()
                    os.fsync(f.fileno())
                if os.path.exists(final):
                    if self.marker(final).get("run_id") != self.run_id and self.marker(final):
                        raise CheckpointError(f"{final} belongs to another run (run_id "
                                              f"{self.marker(final).get('run_id')}); not replacing it")
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except (OSError, CheckpointError) as e:
                error = e
        failed = not _all_ok(error is None)
        if failed:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            _barrier()
            reason = _reason(error) if error is not None else "another rank failed"
            raise CheckpointError(f"could not write checkpoint {final}: {reason}") from None
        if rank == 0:
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints of this run's lineage; never touch another run's."""
        mine = [(s, p) for s, p in self.complete_checkpoints() if self.marker(p).get("run_id") == self.run_id]
        for _, path in mine[: max(0, len(mine) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    # --- loading --------------------------------------------------------------------------

    @staticmethod
    def load_into(path: str, state: dict, per_rank: dict | None = None, layout: dict | None = None,
                  verify: bool = True) -> None:
        """Load a checkpoint into live objects (collective): every ``state`` entry (objects with
        ``load_state_dict``) gets its saved state, tensors resharded to the current layout;
        ``per_rank`` objects get the state saved by the rank :func:`per_rank_source` picks (this
        rank's own under the same layout, else one of the same data-parallel rank). Whether a
        per-rank state can continue under a changed dp size is its own object's call (the
        WebDataset source refuses; the synthetic one is exact)."""
        rank, world = _dist()
        if verify:
            verify_checkpoint(path, (0, 1))
        saved = read_json(os.path.join(path, STATE_JSON))
        template = _as_tree(state)
        for name in template:
            if name not in saved["state"]:
                raise CheckpointError(f"{path}: checkpoint has no '{name}' state")
        tree = {name: merge_tree(saved["state"][name], template[name], (name,)) for name in template}
        _, tensors = split_tree(tree)
        _load_tensors(path, tensors, no_dist=not collectives.initialized())
        for name, obj in state.items():
            obj.load_state_dict(tree[name])
        if per_rank:
            source = per_rank_source(saved.get("layout"), int(saved.get("world_size", 1)), layout, rank, world)
            mine = _uninline_tensors(read_json(os.path.join(path, f"rank_{source:05d}.json")))
            for name, obj in per_rank.items():
                if name not in mine:
                    raise CheckpointError(f"{path}: checkpoint has no per-rank '{name}' state")
                obj.load_state_dict(mine[name])

    @staticmethod
    def load(path: str, map_location="cpu") -> dict:
        """The whole checkpoint on one process, tensors unsharded (tools, tests, export): the shared
        state, plus ``rank`` (rank 0's per-rank state)."""
        if not os.path.isdir(os.path.join(path, TENSORS)) and os.path.exists(os.path.join(path, "state.pt")):
            return _load_legacy(path, map_location)
        if not os.path.exists(os.path.join(path, STATE_JSON)):
            raise CheckpointError(f"{path}: no {STATE_JSON} (not a checkpoint folder)")
        if os.path.exists(os.path.join(path, MARKER)):
            verify_checkpoint(path)
        saved = read_json(os.path.join(path, STATE_JSON))
        metadata = SafeFileSystemReader(os.path.join(path, TENSORS)).read_metadata()
        tensors = {}
        for key, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                tensors[key] = torch.empty(md.size, dtype=md.properties.dtype)
        _load_tensors(path, tensors, no_dist=True)
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
        out = merge_tree(saved["state"], None, (), tensors)
        rank0 = os.path.join(path, "rank_00000.json")
        if os.path.exists(rank0):
            out["rank"] = _uninline_tensors(read_json(rank0))
        return out

    @staticmethod
    def step_of(path: str) -> int:
        with open(os.path.join(path, MARKER)) as f:
            return int(json.load(f)["step"])


def per_rank_source(saved_layout: dict | None, saved_world: int, layout: dict | None, rank: int, world: int) -> int:
    """The saved rank whose per-rank state (data position, RNG) rank ``rank`` resumes from.

    Same layout: its own. Another layout: the saved rank with cp_rank = tp_rank = 0 of this rank's
    data-parallel rank (ranks are ``(dp_rank * cp + cp_rank) * tp + tp_rank``), so each dp rank
    keeps its own data stream (a changed cp or tp leaves the data split as it was); when dp itself
    changed, dp rank ``d`` gets saved dp rank ``d mod saved_dp`` and the data source decides
    (see :meth:`magitrain.data_pipeline.source.WebDatasetSource.load_state_dict`). Checkpoints
    without a recorded layout: own rank at the same world size, else rank 0.
    """
    if saved_layout is None or layout is None:
        return rank if saved_world == world else 0
    if all(int(saved_layout[k]) == int(layout[k]) for k in ("dp", "cp", "tp")):
        return rank
    dp_rank = rank // (int(layout["cp"]) * int(layout["tp"]))
    return (dp_rank % int(saved_layout["dp"])) * int(saved_layout["cp"]) * int(saved_layout["tp"])


def _load_tensors(path: str, tensors: dict, no_dist: bool) -> None:
    """Fill ``tensors`` (plain or DTensor, current layout) in place from the checkpoint's DCP data."""
    reader = SafeFileSystemReader(os.path.join(path, TENSORS))
    metadata = reader.read_metadata()
    for key, t in tensors.items():
        md = metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{path}: checkpoint has no tensor '{key}'")
        if tuple(md.size) != tuple(t.shape):
            raise CheckpointError(f"{path}: tensor '{key}' has shape {list(md.size)} in the checkpoint, "
                                  f"{list(t.shape)} now")
    staged = {k: checkpoint_layout(t) for k, t in tensors.items()}  # DCP-readable shards of the same tensors
    try:
        dcp.load(staged, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=no_dist,
                 process_group=None if no_dist else _dcp_group())
    except CheckpointError:
        raise
    except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot be loaded ({_reason(e)})") from None
    with torch.no_grad():
        for key, t in tensors.items():
            if staged[key] is not t:
                t.copy_(staged[key].redistribute(t.device_mesh, t.placements))


def _reason(error: BaseException) -> str:
    """A one-line cause; DCP's CheckpointException wraps each failed rank's exception."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, wrapped = sorted(failures.items())[0]
        inner = getattr(wrapped, "exception", wrapped)
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            inner = inner[0]  # DCP's (exception, StackSummary) pairs
        return f"rank {rank}: {_reason(inner)}"
    text = " ".join(str(getattr(error, "strerror", None) or error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _load_legacy(path: str, map_location) -> dict:
    """A single-file ``state.pt`` checkpoint (before DCP), read with ``weights_only=True``."""
    file = os.path.join(path, "state.pt")
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or foreign file: say which
        raise CheckpointError(f"{file}: cannot be loaded ({type(e).__name__}: {e})") from None


__all__ = ["MARKER", "CheckpointError", "Checkpointer", "ModelState", "OptimizerState", "RNGState",
           "SafeFileSystemReader", "SafeLoadPlanner", "all_ranks_ok", "sha256_file", "verify_checkpoint"]
