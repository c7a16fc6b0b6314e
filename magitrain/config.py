"""Typed configuration: dataclasses, YAML files and ``key.sub=value`` overrides.

The schema is the set of dataclasses below; OmegaConf checks every YAML key and override
against it (unknown key, wrong type), then :func:`validate` checks combinations (heads that
do not divide, chunks that do not divide frames, a layout that does not match the world
size). :func:`load_config` is the one entry point; a bad config raises :class:`ConfigError`,
which the CLIs turn into a one-line message and exit code 2.

Public contract (other tools rely on these names): ``run.dir``, ``train.steps``,
``train.seed``, ``parallel.dp``, ``parallel.cp``, ``parallel.tp``, ``data.source``,
``data.shards``, ``ckpt.every``, ``ckpt.resume``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem, with a message naming the key and what is allowed."""


@dataclass
class RunConfig:
    dir: str = "runs/default"  # output folder: config, metrics.jsonl, TensorBoard, checkpoints
    overwrite: bool = False  # a fresh run in a folder holding checkpoints: move the old run aside (else an error)


@dataclass
class ModelConfig:
    """The DiT. Field names follow MAGI-1's ``model_config`` where they mean the same."""

    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 2  # MAGI-1: num_attention_heads
    num_kv_heads: int = 1  # MAGI-1: num_query_groups (grouped-query attention)
    head_dim: int = 32  # MAGI-1: kv_channels
    ffn_hidden_size: int = 128
    gated_linear_unit: bool = False  # False: GELU MLP (4.5B); True: SwiGLU (24B)
    in_channels: int = 4  # latent channels the DiT reads
    out_channels: int = 4
    half_channel_vae: bool = False  # 24B: the latent is concatenated with itself on input
    patch_size: int = 2
    t_patch_size: int = 1
    cond_hidden_ratio: float = 0.25  # condition width = ratio * hidden_size
    caption_channels: int = 32  # text-embedding width (T5-XXL: 4096)
    caption_max_length: int = 8  # caption tokens per chunk (MAGI-1: 800)
    null_caption_tokens: int = 50  # valid tokens of the null caption (MAGI-1's pipeline: 50)
    xattn_cond_hidden_ratio: float = 1.0
    cond_gating_ratio: float = 1.0
    x_rescale_factor: float = 1.0
    layernorm_eps: float = 1e-6
    gate_softcap: float = 1.0
    rope_ref_grid: int = 16  # RoPE rescales (rows, cols) to a grid of this side
    chunk_frames: int = 2  # latent frames per chunk (MAGI-1: 6)
    # training visibility for a rolled KV cache (generate --sink-chunks/--max-context): chunk c of a sample sees
    # its first sink_chunks chunks and its max_context_chunks predecessors (0: all history, MAGI-1's mask)
    sink_chunks: int = 0
    max_context_chunks: int = 0
    step_size_conditioning: bool = False  # shortcut-distilled models embed the step size too
    # how the step size is embedded: magi1 = MAGI-1's shared t_embedder (no new keys, loads MAGI-1's distilled
    # weights); zero_init = its own embedder whose last layer starts at zero (a base checkpoint starts unchanged)
    step_size_embedder: str = "magi1"
    init_std: float = 0.02
    lora: "LoraConfig" = field(default_factory=lambda: LoraConfig())  # rank 0: full fine-tuning (no adapters)


# the base Linears of a transformer layer that may carry a LoRA adapter (magitrain/lora.py), by their names
LORA_TARGETS = ("self_attention.linear_qkv.q", "self_attention.linear_qkv.qx", "self_attention.linear_qkv.k",
                "self_attention.linear_qkv.v", "self_attention.linear_kv_xattn", "self_attention.linear_proj",
                "mlp.linear_fc1", "mlp.linear_fc2")


def lora_target_matches(name: str, target: str) -> bool:
    """``target``'s dotted components appear as a contiguous run in ``name``'s (``linear_qkv`` matches
    ``self_attention.linear_qkv.q``; ``linear_qkv.q`` matches only that one)."""
    parts, want = name.split("."), target.split(".")
    return any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1))


@dataclass
class LoraConfig:
    """LoRA adapters (magitrain/lora.py): base weights frozen, only ``lora_A`` / ``lora_B`` train."""

    rank: int = 0  # 0: off
    alpha: float = 16.0  # the delta is scaled by alpha / rank (PEFT's convention)
    # MAGI-1 module names inside each layer, matched by dotted components (linear_qkv = its q, qx, k, v)
    targets: list = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    base_dtype: str = "fp32"  # fp32 | bf16: the frozen base stored in bf16 (half its memory; needs train.dtype=bf16)


@dataclass
class DiffusionConfig:
    """Flow matching, MAGI-1 convention: t in [0, 1], t=0 pure noise, t=1 clean."""

    t_sampler: str = "logit_normal"  # logit_normal | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # SD3 resolution shift of training t (MAGI-1 inference uses 3)
    monotone: str = "sorted"  # how per-chunk t is made non-increasing with chunk index: sorted | window
    window_spread: float = 0.25  # 'window': chunk i gets t_0 - i * spread * U(0,1) (clamped)
    clean_prefix_prob: float = 0.2  # probability a video sample holds its first chunks clean
    max_clean_prefix_chunks: int = 1
    caption_dropout: float = 0.1
    history_dropout: float = 0.1  # a sample whose chunks see only themselves (3-pass CFG)
    clean_t: float = 1.0
    # history noise: [low, high] draws each sample's clean-prefix level t ~ U(low, high) (the chunks stay out of
    # the loss; generate --context-t matches it at inference); []: clean_t, as before
    history_t: list = field(default_factory=list)


@dataclass
class CurriculumStage:
    """One stage of the data curriculum; the trainer switches stage after ``until_step``."""

    name: str = "stage"
    until_step: int = 0  # the stage serves steps < until_step; 0 on the last stage: no end
    seq_tokens: int = 0  # 0: keep data.seq_tokens
    shards: Any = ""  # '' : keep data.shards; a spec string or a list of them, as data.shards
    buckets: list = field(default_factory=list)  # [[frames, height, width, weight], ...] (latent sizes); []: data.buckets
    image_ratio: float = -1.0  # share of videos used as one-frame images; < 0: keep data.image_ratio
    temporal_crop: str = ""  # '' : keep data.temporal_crop


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | webdataset
    # webdataset: a path/URL spec (brace-expandable, '::'-separated, a folder = its *.tar) or a list of specs
    # (YAML list / dotlist data.shards=[a.tar,b.tar]); a spec starting with '{' must be quoted in YAML
    shards: Any = ""
    seq_tokens: int = 256  # tokens per packed sequence
    batch_size: int = 2  # packed sequences per optimizer step (global: over all dp ranks and micro-batches)
    num_workers: int = 0
    shuffle_buffer: int = 64
    max_bad_fraction: float = 0.05
    # synthetic source: latent videos of these sizes (latent frames, height, width)
    frames: int = 4
    height: int = 8
    width: int = 8
    samples_per_seq: int = 2
    curriculum: List[CurriculumStage] = field(default_factory=list)  # empty: one stage from the keys above
    # webdataset source (see data_pipeline/): bucket shapes in latent units (frames, height, width, weight);
    # [] keeps each sample's own size (cropped to whole chunks and patches)
    buckets: list = field(default_factory=list)
    image_ratio: float = 0.0  # probability a video sample is used as a one-frame image
    # where a cut shorter than its sample starts: random (any latent frame) | start (the sample's first frame,
    # for data whose captions describe the clip from its first frame on, as the demo's do)
    temporal_crop: str = "random"
    manifest: str = ""  # '' : manifest.json next to local shards, when present (expected sample counts)
    latent_encoder: str = "patch"  # for raw-media shards: patch | magi1-vae[-tiled] | module.path:factory (factory(channels, weights))
    latent_encoder_weights: str = ""  # local weights: MAGI-1's VAE folder for magi1-vae, or a custom factory's
    text_encoder: str = "hash"  # captions without text_emb.npy: hash | t5 | module.path:factory (factory(dim, max_len, weights))
    text_encoder_weights: str = ""
    pack_bins: int = 4  # open bins of the streaming first-fit packer (more: less padding, more latency)
    bad_check_after: int = 20  # data.max_bad_fraction is enforced once this many samples were read


@dataclass
class ParallelConfig:
    dp: int = 1
    cp: int = 1
    tp: int = 1
    dp_engine: str = "fsdp2"  # fsdp2 | deepspeed
    zero_stage: int = 3  # deepspeed only
    cpu_offload: bool = False  # deepspeed only
    cp_chunk_size: int = 16  # tokens per dispatch chunk
    cp_solver: str = "default"
    cp_solve_ahead: bool = True  # dispatch plans solved in the data loader workers (webdataset source)
    overlap_stages: int = 1
    activation_checkpointing: str = "none"  # none | full | every_k
    sequence_parallel: bool = False  # Megatron-style SP between the TP regions (no effect at tp=1)
    ac_every: int = 2
    timeout_s: float = 120.0
    backend: str = "auto"  # auto | gloo | nccl


@dataclass
class OptimConfig:
    lr: float = 3e-3
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.99  # 0 disables EMA
    # one warm restart from the EMA: at this step the weights become their EMA, the optimizer's moments are
    # reset, and the lr re-warms (restart_warmup_steps) to restart_lr, then cosine-decays to min_lr_ratio of it
    # at train.steps (the first cycle ends at restart_at); 0: no restart
    restart_at: int = 0
    restart_lr: float = 0.0  # 0: optim.lr
    restart_warmup_steps: int = 10


@dataclass
class TrainConfig:
    steps: int = 200
    seed: int = 0
    grad_accum: int = 1
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    stop_at: int = 0  # > 0: save and exit after this step; the lr schedule still spans train.steps (resume to go on)
    compile: bool = False  # torch.compile each transformer block (parallel/compile.py); CPU needs a C compiler


@dataclass
class CkptConfig:
    every: int = 0  # 0: only at the end and on SIGTERM
    resume: str = ""  # '' (fresh run) | auto | path to a checkpoint folder
    keep_last: int = 3
    init_from: str = ""  # start a new run from these weights
    async_save: bool = False
    allow_config_change: bool = False  # resume with changed keys beyond magitrain.run_dir.SAFE_TO_CHANGE
    verify: bool = True  # check every checkpoint file's SHA-256 when loading

@dataclass
class LogConfig:
    every: int = 1
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float = 0.0  # per-device peak FLOP/s for the MFU estimate; 0: a default by device (magitrain.perf)
    # Weights & Biases (pip install -e ".[wandb]"): every metrics.jsonl record also goes to a wandb run in run.dir
    wandb: bool = False
    wandb_project: str = "magitrain"
    wandb_mode: str = "offline"  # offline (no network; `wandb sync run.dir/wandb/offline-run-*` later) | online
    wandb_name: str = ""  # '' : the run dir's name


@dataclass
class DistillConfig:
    """Shortcut + guidance distillation (magitrain/distill.py): the student is the configured model with
    step-size conditioning, initialised from ``ckpt.init_from``; the targets come from a frozen teacher."""

    enabled: bool = False
    teacher: str = ""  # base checkpoint / run dir / release giving the targets; '' : ckpt.init_from
    step_counts: list = field(default_factory=lambda: [64, 32, 16, 8])  # schedules trained, one per step in turn
    schedule_shift: float = 3.0  # the sampling schedule the step sizes come from (must match generation)
    schedule_square: bool = True
    text_scale: float = 7.5  # teacher guidance s_text (MAGI-1: 7.5); 1 with history_scale 1: no guidance
    history_scale: float = 1.5  # s_history of MAGI-1's 3-pass guidance (1: 2-pass or 1-pass teacher)
    self_target: str = "student"  # who takes the two small steps of a large step: student (stop-gradient) | teacher
    finest_target: str = "teacher"  # finest step size: teacher (guided velocity) | data (x_clean - noise)


@dataclass
class RolloutConfig:
    """Training on its own rollouts (``objective: self_rollout``, magitrain/self_rollout.py): the model streams
    a sample's first chunks itself (no gradient), then is trained on the next chunk against a frozen teacher's
    guided velocity on exactly that self-generated history."""

    teacher: str = ""  # frozen teacher checkpoint / run dir / release; '' : ckpt.init_from (one must be given)
    context_chunks: int = 2  # the most chunks a sample streams itself: r ~ U{1..min(this, C-1)} per sample
    steps: int = 4  # Euler steps per self-generated chunk (MAGI-1's schedule: sampling_schedule(steps, shift))
    shift: float = 3.0
    context_t: float = 1.0  # level self-generated chunks are given as history (1: clean; < 1 re-noised, as --context-t)
    text_scale: float = 1.5  # the teacher's guidance (3-pass when history_scale != 1, as distill.text_scale)
    history_scale: float = 1.5


@dataclass
class EvalConfig:
    """Validation during training (magitrain/validation.py): fixed-t flow-matching loss on held-out data,
    and streamed samples of fixed captions."""

    every: int = 0  # run the fixed-t validation loss every this many steps (0: never)
    shards: Any = ""  # held-out shard spec (as data.shards); '' : synthetic clips from a seed no training step uses
    batches: int = 2  # held-out packed sequences (read once at start; the same every time)
    t_values: list = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # metrics val_loss_t<t>
    seed: int = 1234  # noise seed of the validation loss (fixed: comparable across runs and resumes)
    video_every: int = 0  # stream a sample per caption every this many steps (0: never)
    captions: list = field(default_factory=list)  # fixed captions of the samples (empty: no samples)
    sample_chunks: int = 2
    sample_steps: int = 8
    sample_window: int = 2
    cfg_scale: float = 1.0
    sample_seed: int = 0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # what the model is trained to predict: flow_matching (the data's velocity) | self_rollout (a frozen teacher's
    # velocity on the model's own rollouts, ``rollout:``); distill.enabled selects shortcut distillation instead
    objective: str = "flow_matching"
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _positive(key: str, value, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key}={value} must be {'>= 0' if zero_ok else '> 0'}")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check combinations the type system cannot; raise :class:`ConfigError` naming the key."""
    m, d, p = cfg.model, cfg.data, cfg.parallel
    for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
                "in_channels", "out_channels", "patch_size", "t_patch_size", "caption_channels",
                "caption_max_length", "chunk_frames"):
        _positive(f"model.{key}", getattr(m, key))
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} must divide model.hidden_size={m.hidden_size}")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}")
    if m.head_dim % 8:
        raise ConfigError(f"model.head_dim={m.head_dim} must be a multiple of 8 (3D RoPE uses head_dim/8 bands per axis)")
    if m.hidden_size % 8:
        raise ConfigError(f"model.hidden_size={m.hidden_size} must be a multiple of 8")
    _choice("diffusion.t_sampler", cfg.diffusion.t_sampler, ("logit_normal", "uniform"))
    _choice("diffusion.monotone", cfg.diffusion.monotone, ("sorted", "window"))
    _positive("diffusion.shift", cfg.diffusion.shift)
    for key in ("caption_dropout", "history_dropout", "clean_prefix_prob"):
        v = getattr(cfg.diffusion, key)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"diffusion.{key}={v} must be in [0, 1]")
    for key in ("sink_chunks", "max_context_chunks"):
        _positive(f"model.{key}", getattr(m, key), zero_ok=True)
    if m.sink_chunks and not m.max_context_chunks:
        raise ConfigError(f"model.sink_chunks={m.sink_chunks} needs model.max_context_chunks > 0 (with all history "
                          "visible a sink changes nothing)")
    ht = cfg.diffusion.history_t
    if len(ht) not in (0, 2) or not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in ht) \
            or (ht and ht[0] > ht[1]):
        raise ConfigError(f"diffusion.history_t={list(ht)} must be [] (clean_t) or [low, high] with "
                          "0 <= low <= high <= 1")
    _choice("data.source", d.source, ("synthetic", "webdataset"))
    _check_shards("data.shards", d.shards)
    for i, stage in enumerate(d.curriculum):
        _check_shards(f"data.curriculum[{i}].shards", stage.shards)
    if d.source == "webdataset" and not d.shards and not d.curriculum:
        raise ConfigError("data.source=webdataset needs data.shards (a brace-expandable path or URL list)")
    if d.source == "synthetic":
        if d.frames % (m.chunk_frames * m.t_patch_size):
            raise ConfigError(f"model.chunk_frames={m.chunk_frames} must divide the synthetic video's "
                              f"data.frames={d.frames} (in latent frames after t_patch_size={m.t_patch_size})")
        if d.height % m.patch_size or d.width % m.patch_size:
            raise ConfigError(f"model.patch_size={m.patch_size} must divide data.height={d.height} and data.width={d.width}")
        tokens = d.frames // m.t_patch_size * (d.height // m.patch_size) * (d.width // m.patch_size)
        if tokens * d.samples_per_seq > d.seq_tokens:
            raise ConfigError(f"data.seq_tokens={d.seq_tokens} cannot hold data.samples_per_seq={d.samples_per_seq} "
                              f"samples of {tokens} tokens")
    _positive("data.seq_tokens", d.seq_tokens)
    _positive("data.batch_size", d.batch_size)
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={d.max_bad_fraction} must be in [0, 1]")
    for key in ("dp", "cp", "tp"):
        _positive(f"parallel.{key}", getattr(p, key))
    if p.dp_engine == "ddp":
        raise ConfigError("parallel.dp_engine=ddp is not implemented; use fsdp2 (the default, same gradients at "
                          "any dp) or deepspeed")
    _choice("parallel.dp_engine", p.dp_engine, ("fsdp2", "deepspeed"))
    _choice("parallel.activation_checkpointing", p.activation_checkpointing, ("none", "full", "every_k"))
    _choice("parallel.backend", p.backend, ("auto", "gloo", "nccl"))
    _positive("parallel.cp_chunk_size", p.cp_chunk_size)
    _positive("parallel.overlap_stages", p.overlap_stages)
    _positive("parallel.timeout_s", p.timeout_s)
    if m.num_heads % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} must divide model.num_heads={m.num_heads}")
    if m.num_kv_heads % p.tp and p.tp % m.num_kv_heads:
        raise ConfigError(f"parallel.tp={p.tp} and model.num_kv_heads={m.num_kv_heads}: one must divide the other "
                          "(KV heads are split by tp, or replicated when tp exceeds them)")
    if m.ffn_hidden_size % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} must divide model.ffn_hidden_size={m.ffn_hidden_size}")
    _positive("train.grad_accum", cfg.train.grad_accum)
    if d.batch_size % (p.dp * cfg.train.grad_accum):
        raise ConfigError(f"data.batch_size={d.batch_size} (sequences per step, global) must be a multiple of "
                          f"parallel.dp x train.grad_accum = {p.dp} x {cfg.train.grad_accum}")
    if world_size is not None and p.dp * p.cp * p.tp != world_size:
        raise ConfigError(f"parallel.dp x parallel.cp x parallel.tp = {p.dp} x {p.cp} x {p.tp} = "
                          f"{p.dp * p.cp * p.tp}, but the job has {world_size} processes")
    if p.cp > 1 and d.seq_tokens < p.cp * p.cp_chunk_size:
        raise ConfigError(f"data.seq_tokens={d.seq_tokens} is shorter than parallel.cp={p.cp} chunks of "
                          f"parallel.cp_chunk_size={p.cp_chunk_size}")
    _positive("train.steps", cfg.train.steps, zero_ok=True)
    if not 0 <= cfg.train.stop_at <= cfg.train.steps:
        raise ConfigError(f"train.stop_at={cfg.train.stop_at} must be in [0, train.steps={cfg.train.steps}]")
    _choice("train.dtype", cfg.train.dtype, ("fp32", "bf16"))
    if cfg.train.compile and p.tp > 1:
        raise ConfigError(f"train.compile=true with parallel.tp={p.tp} is not supported (TP's module hooks inside "
                          "the compiled block are untested); use parallel.tp=1 or train.compile=false")
    _positive("ckpt.every", cfg.ckpt.every, zero_ok=True)
    _positive("ckpt.keep_last", cfg.ckpt.keep_last)
    o = cfg.optim
    _positive("optim.lr", o.lr, zero_ok=True)
    _positive("optim.eps", o.eps, zero_ok=True)
    _positive("optim.weight_decay", o.weight_decay, zero_ok=True)
    _positive("optim.warmup_steps", o.warmup_steps, zero_ok=True)
    _positive("optim.grad_clip", o.grad_clip)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay={cfg.optim.ema_decay} must be in [0, 1)")
    if o.restart_at:
        if not 0 < o.restart_at < cfg.train.steps:
            raise ConfigError(f"optim.restart_at={o.restart_at} must be in (0, train.steps={cfg.train.steps})")
        if o.ema_decay == 0:
            raise ConfigError("optim.restart_at restarts from the EMA weights: it needs optim.ema_decay > 0")
        if cfg.parallel.dp_engine == "deepspeed":
            raise ConfigError("optim.restart_at is not supported with parallel.dp_engine=deepspeed (its engine "
                              "owns the optimizer state)")
    _positive("optim.restart_lr", o.restart_lr, zero_ok=True)
    _positive("optim.restart_warmup_steps", o.restart_warmup_steps, zero_ok=True)
    _positive("log.peak_flops", cfg.log.peak_flops, zero_ok=True)
    _choice("model.step_size_embedder", m.step_size_embedder, ("magi1", "zero_init"))
    _choice("log.wandb_mode", cfg.log.wandb_mode, ("offline", "online"))
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb=true needs the wandb package: pip install -e \".[wandb]\" (or log.wandb=false)")
    if cfg.distill.enabled:
        validate_distill(cfg)
    _choice("objective", cfg.objective, OBJECTIVES)
    if cfg.objective == "self_rollout":
        validate_rollout(cfg)
    if m.lora.rank:
        validate_lora(cfg)
    validate_eval(cfg)


def validate_lora(cfg: Config) -> None:
    """Config checks for ``model.lora.rank > 0`` (the adapters themselves are magitrain/lora.py)."""
    lo = cfg.model.lora
    _positive("model.lora.rank", lo.rank)
    _positive("model.lora.alpha", lo.alpha)
    if not isinstance(lo.targets, list) or not lo.targets or not all(isinstance(t, str) and t for t in lo.targets):
        raise ConfigError(f"model.lora.targets={lo.targets!r} must be a non-empty list of module names")
    unknown = [t for t in lo.targets if not any(lora_target_matches(n, t) for n in LORA_TARGETS)]
    if unknown:
        raise ConfigError(f"model.lora.targets: {unknown[0]!r} names no adaptable module; choose from "
                          f"{', '.join(sorted({n.split('.')[-1] for n in LORA_TARGETS} | {'linear_qkv'}))}")
    _choice("model.lora.base_dtype", lo.base_dtype, ("fp32", "bf16"))
    if lo.base_dtype == "bf16" and cfg.train.dtype != "bf16":
        raise ConfigError("model.lora.base_dtype=bf16 needs train.dtype=bf16 (the base's matmuls run under bf16 autocast)")
    if not cfg.ckpt.init_from:
        raise ConfigError("model.lora.rank > 0 needs ckpt.init_from (the frozen base the adapters train on; "
                          "its path and checksum go into every checkpoint)")
    if cfg.parallel.dp_engine == "deepspeed":
        raise ConfigError("model.lora with parallel.dp_engine=deepspeed is not supported; use fsdp2")
    if cfg.distill.enabled:
        raise ConfigError("model.lora with distill.enabled is not supported")
    if cfg.parallel.sequence_parallel and cfg.parallel.tp > 1:
        raise ConfigError("model.lora with parallel.sequence_parallel is not supported (the adapters add "
                          "sequence-replicated outputs); set parallel.sequence_parallel=false")


def validate_eval(cfg: Config) -> None:
    e = cfg.eval
    for key in ("every", "video_every"):
        _positive(f"eval.{key}", getattr(e, key), zero_ok=True)
    _positive("eval.batches", e.batches)
    _check_shards("eval.shards", e.shards)
    if not e.t_values or not all(isinstance(t, (int, float)) and 0.0 <= t <= 1.0 for t in e.t_values):
        raise ConfigError(f"eval.t_values={list(e.t_values)} must be a non-empty list of numbers in [0, 1]")
    if not all(isinstance(c, str) for c in e.captions):
        raise ConfigError("eval.captions must be a list of strings")
    for key in ("sample_chunks", "sample_steps", "sample_window"):
        _positive(f"eval.{key}", getattr(e, key))
    if e.sample_steps % e.sample_window:
        raise ConfigError(f"eval.sample_window={e.sample_window} must divide eval.sample_steps={e.sample_steps}")


OBJECTIVES = ("flow_matching", "self_rollout")


def validate_rollout(cfg: Config) -> None:
    """Config checks for ``objective: self_rollout`` (the objective itself is magitrain/self_rollout.py)."""
    r = cfg.rollout
    if cfg.distill.enabled:
        raise ConfigError("objective=self_rollout with distill.enabled: both choose the training target; "
                          "set one (distill.enabled=false, or objective=flow_matching)")
    if cfg.model.step_size_conditioning:
        raise ConfigError("objective=self_rollout trains a base model: set model.step_size_conditioning=false "
                          "(its rollouts and targets are plain velocities, not step-size conditioned ones)")
    if cfg.model.lora.rank:
        raise ConfigError("objective=self_rollout with model.lora is not supported (the teacher is checked and "
                          "loaded as a full model of the student's architecture); set model.lora.rank=0")
    if not (r.teacher or cfg.ckpt.init_from):
        raise ConfigError("objective=self_rollout needs a frozen teacher: set rollout.teacher or ckpt.init_from "
                          "(a base checkpoint)")
    if r.context_chunks < 1:
        raise ConfigError(f"rollout.context_chunks={r.context_chunks} must be >= 1 (chunks a sample streams itself)")
    if r.steps < 1:
        raise ConfigError(f"rollout.steps={r.steps} must be >= 1 (Euler steps per self-generated chunk)")
    if r.shift <= 0:
        raise ConfigError(f"rollout.shift={r.shift} must be > 0")
    if not 0.0 <= r.context_t <= 1.0:
        raise ConfigError(f"rollout.context_t={r.context_t} must be in [0, 1] (1: clean history)")
    for key in ("text_scale", "history_scale"):
        if getattr(r, key) <= 0:
            raise ConfigError(f"rollout.{key}={getattr(r, key)} must be > 0 (1: no guidance)")


def validate_distill(cfg: Config) -> None:
    """Config checks for ``distill.enabled`` (the objective itself is magitrain/distill.py)."""
    d = cfg.distill
    if not cfg.model.step_size_conditioning:
        raise ConfigError("distill.enabled needs model.step_size_conditioning=true (the student is told its step size)")
    if not (d.teacher or cfg.ckpt.init_from):
        raise ConfigError("distill.enabled needs a teacher: set distill.teacher or ckpt.init_from (a base checkpoint)")
    counts = list(d.step_counts)
    if not counts or any(not isinstance(k, int) or k < 1 for k in counts):
        raise ConfigError(f"distill.step_counts={counts} must be a non-empty list of positive step counts")
    finest = max(counts)
    bad = [k for k in counts if k != finest and finest % (2 * k)]
    if bad:
        raise ConfigError(f"distill.step_counts={counts}: every count but the finest ({finest}) must have 2x the count "
                          f"dividing {finest} (a big step is two steps of the finer schedule); {bad} do not")
    if d.schedule_shift <= 0:
        raise ConfigError(f"distill.schedule_shift={d.schedule_shift} must be > 0")
    _choice("distill.self_target", d.self_target, ("student", "teacher"))
    _choice("distill.finest_target", d.finest_target, ("teacher", "data"))


def _check_shards(key: str, value) -> None:
    if isinstance(value, dict):
        raise ConfigError(f"{key} was read as a mapping {value!r}: quote a brace pattern that starts with '{{' "
                          f"(YAML: shards: '{{a,b}}.tar'), or give a list: [a.tar, b.tar]")
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}={value!r} must be a path/URL spec or a list of them")


def shard_specs(value) -> list[str]:
    """``data.shards`` (or a stage's) as a list of specs: a string is one spec, a list is several."""
    if isinstance(value, str):
        return [value] if value else []
    return list(value)


# override keys whose value is a shard spec: one that starts with '{' is a brace pattern, not a YAML mapping
_SHARD_KEY = re.compile(r"^data\.(curriculum\.\d+\.)?shards$")


def _quote_brace_specs(overrides: list[str]) -> list[str]:
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if _SHARD_KEY.match(key.strip()) and value.startswith("{"):
            o = f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(o)
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    """Schema defaults <- YAML file <- dotlist overrides, then :func:`validate`."""
    try:
        schema = OmegaConf.structured(Config)
        layers = [schema]
        if path:
            layers.append(_load_yaml_file(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key.sub=value, got: {' '.join(bad)}")
            layers.append(OmegaConf.from_dotlist(_quote_brace_specs(list(overrides))))
        merged = OmegaConf.merge(*layers)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    validate(cfg, world_size)
    return cfg


def _load_yaml_file(path: str):
    """The YAML mapping in ``path``, or a :class:`ConfigError` (missing, a folder, bad YAML, not a mapping)."""
    import yaml

    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}: YAML syntax error{where}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections (run:, model:, ...), "
                          f"got a {type(loaded).__name__.replace('Config', '').lower()}")
    return loaded


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    if "Key '" in msg and "not in" in msg or type(e).__name__ == "ConfigKeyError":
        return f"unknown config key '{key}'" + (f" ({msg})" if key is None else "")
    if type(e).__name__ == "ValidationError":
        return f"wrong type for config key '{key}': {msg}"
    return f"config error at '{key}': {msg}" if key else f"config error: {msg}"


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_yaml(cfg))
    os.replace(tmp, path)


def config_from_yaml_text(text: str) -> Config:
    """Rebuild a config saved by :func:`save_config` (e.g. from a checkpoint)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text)))
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
