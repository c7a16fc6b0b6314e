"""Memory and communication planner: does a dp x cp x tp layout fit, before launching it?

``python -m magitrain.plan --config configs/magi1_24b.yaml parallel.dp=8 parallel.cp=8 parallel.tp=8
[--gpu-memory 80GB] [--json]`` prints, for the most loaded rank (rank 0):

- **parameters, gradients, optimizer state, EMA**: counted from the real model's parameter
  shapes (built on the meta device) through the layout's sharding rules: TP as
  :data:`TP_RULES` (the agreed spec), then FSDP2's per-parameter dim-0 chunks over ``dp x cp``
  (``torch.chunk``: ``ceil(rows / D)`` rows, the last ranks fewer), or DeepSpeed ZeRO's flat
  partitions over ``dp``. FSDP2 keeps fp32 sharded weights, fp32 sharded gradients
  (``reduce_dtype``) and two fp32 Adam moments; the EMA is one fp32 copy of the shards.
- **FSDP buffers**: the unsharded layer FSDP2 all-gathers (current + prefetched layer in the
  parameter dtype) and the layer's unsharded gradients before their reduce-scatter.
- **activations**: one transformer layer's saved-for-backward tensors, measured by running the
  real layer code on fake tensors (``FakeTensorMode``: shapes and dtypes only, no memory) at the
  rank's local widths (heads / tp, ffn / tp) and local tokens (``seq_tokens / cp``), under bf16
  autocast when ``train.dtype=bf16``. On CUDA the attention kernels keep ``q, k, v, out, lse``
  (flex / flash); ``--device cpu`` traces the CPU kernels as they are (dense scores per slice).
  Activation checkpointing (``full`` / ``every_k``) keeps a checkpointed layer's input only; the
  backward of one layer then rematerialises its whole saved set. Sequence parallel divides the
  tensors saved between the TP regions (``[n, hidden]`` ones outside the column-parallel
  linears) by tp.
- **communication per optimizer step, per axis** (bytes this rank sends): TP all-reduces of the
  two row-parallel outputs per layer in the forward, of the two column-parallel inputs'
  gradients in the backward, again in the recompute; CP: the remote KV of the dispatch solver's
  plan of a representative mask (one video of the config's chunk shape filling ``seq_tokens``),
  fetched in the forward (and recompute) and its gradient sent back; FSDP: all-gather of the
  parameters in the forward and the backward, reduce-scatter of the gradients, per micro-batch.
- **verdict**: fits when the total is at most ``(1 - RESERVED)`` of ``--gpu-memory`` (the rest:
  CUDA context, NCCL buffers, allocator fragmentation).

Bad input (unknown config, a layout that does not divide the heads or the world): one line
``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field

import torch

from magitrain.config import Config, ConfigError, load_config

RESERVED = 0.10  # share of GPU memory kept for the CUDA context, NCCL buffers and fragmentation
WEBDATASET_FRAME_TOKENS = 3600  # a 720x1280 frame: 90x160 latent (VAE /8), 45x80 patches of 2x2

# The TP layout (Megatron's, expressed as DTensor placements; parallel/tensor_parallel.py applies it):
# "col": rows (dim 0) split by tp; "row": columns (dim 1) split by tp; "kv": rows split by KV heads
# when tp <= num_kv_heads; when tp > num_kv_heads the KV weights stay whole on every rank (each rank
# computes only the head its queries use: parallel/tensor_parallel.py);
# anything not listed is replicated over tp.
TP_RULES = (
    (r"ada_modulate_layer\.proj\.0\.(weight|bias)$", "col"),
    (r"self_attention\.linear_qkv\.(q|qx)\.weight$", "col"),
    (r"self_attention\.linear_qkv\.(k|v)\.weight$", "kv"),
    (r"self_attention\.linear_kv_xattn\.weight$", "kv"),
    (r"self_attention\.linear_proj\.weight$", "row"),
    (r"mlp\.linear_fc1\.weight$", "col"),  # SwiGLU: [gate | up] rows, each rank a matching half of both
    (r"mlp\.linear_fc2\.weight$", "row"),
)


def tp_rule(name: str) -> str:
    for pattern, rule in TP_RULES:
        if re.search(pattern, name):
            return rule
    return "replicated"


def tp_local_shape(name: str, shape: tuple, tp: int, kv_heads: int) -> tuple:
    """The shape of parameter ``name`` on one TP rank."""
    rule = tp_rule(name) if tp > 1 else "replicated"
    if rule == "col":
        return (shape[0] // tp, *shape[1:])
    if rule == "row":
        return (shape[0], shape[1] // tp, *shape[2:])
    if rule == "kv":
        return (shape[0] // tp, *shape[1:]) if tp <= kv_heads else shape
    return tuple(shape)


def fsdp_rows(rows: int, shards: int, index: int) -> int:
    """Rows of a dim-0 FSDP2 shard (``torch.chunk``): ``ceil(rows / shards)``, fewer at the end."""
    chunk = -(-rows // shards)
    return max(0, min(chunk, rows - index * chunk))


def meta_model(cfg: Config):
    from magitrain.model import MagiDiT

    with torch.device("meta"):
        return MagiDiT(cfg.model)


def rank_coords(rank: int, cp: int, tp: int) -> tuple[int, int, int]:
    """``(dp_rank, cp_rank, tp_rank)`` of a global rank (``r = (dp_rank * cp + cp_rank) * tp + tp_rank``)."""
    return rank // (cp * tp), rank // tp % cp, rank % tp


def rank_elements(cfg: Config, rank: int = 0, model=None) -> dict[str, int]:
    """Elements of each parameter that global ``rank`` holds (FSDP2 over dp x cp after TP; DeepSpeed
    ZeRO-3's flat partition over dp; the whole TP-local tensor with ZeRO-1/2 or one rank). Exact:
    what ``p._local_tensor.numel()`` (FSDP2) reads on that rank."""
    p = cfg.parallel
    model = model if model is not None else meta_model(cfg)
    dp_rank, cp_rank, _ = rank_coords(rank, p.cp, p.tp)
    shards, index = p.dp * p.cp, dp_rank * p.cp + cp_rank
    out = {}
    for name, param in model.named_parameters():
        shape = tp_local_shape(name, tuple(param.shape), p.tp, cfg.model.num_kv_heads)
        rest = math.prod(shape[1:])
        if p.dp_engine == "deepspeed":
            out[name] = _zero_partition(math.prod(shape), p.dp, dp_rank) if p.zero_stage == 3 else math.prod(shape)
        elif shards > 1:
            out[name] = fsdp_rows(shape[0], shards, index) * rest
        else:
            out[name] = math.prod(shape)
    return out


def _zero_partition(numel: int, dp: int, rank: int) -> int:
    part = -(-numel // dp)
    return max(0, min(part, numel - rank * part))


# ------------------------------------------------------------------------------------------
# Activations: the real layer on fake tensors
# ------------------------------------------------------------------------------------------

class _KernelLikeAttention(torch.autograd.Function):
    """Attention with the memory behaviour of flex / flash: saves ``q, k, v, out, lse`` only."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:2], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # never run: the planner traces the forward only
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _kernel_like(q, k, v, slices, scale=None, backend=None):
    return _KernelLikeAttention.apply(q, k, v)


@contextlib.contextmanager
def _cuda_attention_kernels(layer):
    """Swap the layer's self- and cross-attention for :class:`_KernelLikeAttention` meanwhile."""
    import magitrain.model as model_module

    core = layer.self_attention.core_attention
    saved = model_module.slice_attention
    layer.self_attention.core_attention = type("KernelLike", (torch.nn.Module,), {
        "forward": lambda self, q, k, v, slices: _kernel_like(q, k, v, slices)[0]})()
    model_module.slice_attention = _kernel_like
    try:
        yield
    finally:
        layer.self_attention.core_attention = core
        model_module.slice_attention = saved


@dataclass
class LayerTrace:
    """Saved-for-backward bytes of one layer: ``total``, of which ``between`` are the ``[n, hidden]``
    tensors outside the column-parallel linears (what sequence parallel divides by tp)."""

    total: int
    between: int
    largest: int  # the largest single saved tensor


def representative_layout(cfg: Config, frame_tokens: int | None = None):
    """The micro-batch the planner dispatches and traces (``batch_size / (dp x grad_accum)`` packed
    sequences): the synthetic source's samples as it packs them; otherwise, per sequence, one video
    of ``frame_tokens`` patches a frame in as many whole chunks as ``data.seq_tokens`` holds (the
    videos end to end, the padding of all sequences at the end)."""
    from magitrain.layout import PackedLayout, SampleSpan

    m, d = cfg.model, cfg.data
    seqs = sequences_per_micro_batch(cfg)
    if d.source == "synthetic" and frame_tokens is None:  # what the synthetic source packs
        grid = (d.frames // m.t_patch_size, d.height // m.patch_size, d.width // m.patch_size)
        per_seq = [(i * d.seq_tokens + j * math.prod(grid), grid) for i in range(seqs) for j in range(d.samples_per_seq)]
    else:
        frame_tokens = frame_tokens or WEBDATASET_FRAME_TOKENS
        chunks = max(1, d.seq_tokens // (m.chunk_frames * frame_tokens))
        video = (chunks * m.chunk_frames, frame_tokens, 1)
        per_seq = [(i * math.prod(video), video) for i in range(seqs)]  # samples contiguous, padding at the end
    spans = tuple(SampleSpan(offset, *grid, m.chunk_frames) for offset, grid in per_seq)
    return PackedLayout(spans, seqs * d.seq_tokens, m.sink_chunks, m.max_context_chunks)


def sequences_per_micro_batch(cfg: Config) -> int:
    """Packed sequences one rank's forward holds: ``batch_size / (dp x grad_accum)``."""
    return max(1, cfg.data.batch_size // (cfg.parallel.dp * cfg.train.grad_accum))


def local_model_config(cfg: Config):
    """The layer widths of one TP rank: heads / tp, KV heads / tp (at least 1), ffn / tp."""
    m, tp = cfg.model, cfg.parallel.tp
    return dataclasses.replace(m, num_heads=m.num_heads // tp, num_kv_heads=max(m.num_kv_heads // tp, 1),
                               ffn_hidden_size=m.ffn_hidden_size // tp)


def trace_layer(cfg: Config, tokens: int, chunks: int, device: str = "cuda", slices=None) -> LayerTrace:
    """Run one transformer layer of ``cfg`` at a TP rank's widths on ``tokens`` fake tokens in
    ``chunks`` chunks and add up what autograd saves (``device='cuda'``: attention as the CUDA
    kernels keep it; ``'cpu'``: the CPU kernels as they run, on ``slices``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from magitrain.model import TransformerLayer
    from magitrain.parallel.mask import AttnRange, AttnSlice, AttnSlices

    m = local_model_config(cfg)
    hidden, cond_dim = m.hidden_size, int(m.hidden_size * m.cond_hidden_ratio)
    caption_len = chunks * m.caption_max_length
    if slices is None:
        slices = AttnSlices([AttnSlice(AttnRange(0, tokens), AttnRange(0, tokens))], tokens)
    per_chunk = -(-tokens // chunks)
    xattn = AttnSlices([AttnSlice(AttnRange(c * per_chunk, min(tokens, (c + 1) * per_chunk)),
                                  AttnRange(c * m.caption_max_length, (c + 1) * m.caption_max_length))
                        for c in range(chunks) if c * per_chunk < tokens], tokens, caption_len)
    in_col_linear = [0]
    with FakeTensorMode(allow_non_fake_inputs=False):
        layer = TransformerLayer(m, cond_dim)
        counter = _SavedBytes(layer, lambda t: (not in_col_linear[0] and t.dim() == 2
                                                and tuple(t.shape) == (tokens, hidden)))
        col = [layer.self_attention.linear_qkv[n] for n in ("q", "qx", "k", "v")] + [layer.mlp.linear_fc1]
        for mod in col:
            mod.register_forward_pre_hook(lambda *a: in_col_linear.__setitem__(0, in_col_linear[0] + 1))
            mod.register_forward_hook(lambda *a: in_col_linear.__setitem__(0, in_col_linear[0] - 1))
        h = torch.empty(tokens, hidden, requires_grad=True)
        cond = torch.empty(chunks, cond_dim)
        chunk_ids = (torch.arange(tokens) // per_chunk).clamp(max=chunks - 1)
        rope = (torch.empty(tokens, 3 * m.head_dim // 8), torch.empty(tokens, 3 * m.head_dim // 8))
        caption = torch.empty(caption_len, int(hidden * m.xattn_cond_hidden_ratio))
        kernels = _cuda_attention_kernels(layer) if device == "cuda" else contextlib.nullcontext()
        with kernels, _autocast(cfg), counter:
            layer(h, cond, chunk_ids, rope, caption, slices, xattn)
    return LayerTrace(counter.total, counter.tagged, counter.largest)


def _autocast(cfg: Config):
    return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.train.dtype == "bf16" else contextlib.nullcontext()


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the memory autograd keeps for the backward while active: each storage once (ops
    save the same tensor, or views of it, many times), parameters excluded (they are not
    activations); ``tagged``: the part whose tensors satisfy ``tag``."""

    def __init__(self, module: torch.nn.Module, tag=lambda t: False):
        self.params = {p.untyped_storage()._cdata for p in module.parameters()}
        self.seen: set = set()
        self.total = self.tagged = self.largest = 0

        def pack(t):
            key = t.untyped_storage()._cdata
            if key not in self.params and key not in self.seen:
                self.seen.add(key)
                nbytes = t.untyped_storage().nbytes()
                self.total += nbytes
                self.largest = max(self.largest, nbytes)
                if tag(t):
                    self.tagged += nbytes
            return t

        super().__init__(pack, lambda t: t)


def trace_outside_layers(cfg: Config, tokens: int, chunks: int) -> int:
    """What autograd keeps outside the transformer layers: patch embedding, conditioning, caption
    projection, RoPE, final norm and linear (the real modules on fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from magitrain.model import MagiDiT

    m = dataclasses.replace(cfg.model, num_layers=0)
    with FakeTensorMode(allow_non_fake_inputs=False):
        model = MagiDiT(m)
        counter = _SavedBytes(model)
        x = torch.empty(tokens, m.in_channels // (2 if m.half_channel_vae else 1), m.t_patch_size,
                        m.patch_size, m.patch_size)
        with _autocast(cfg), counter:
            cond = model.condition(torch.empty(chunks), torch.zeros(chunks, dtype=torch.bool))
            caption = model.y_embedder.xattn(torch.empty(chunks * m.caption_max_length, m.caption_channels))
            rope = model.rope(torch.empty(tokens, 3))
            h = model.embed(x)
            out = model.head(h + 0 * (cond.sum() + caption.sum() + rope[0].sum()))
            (out.float() ** 2).mean()  # the loss's squared error
    return counter.total


# ------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------

@dataclass
class Plan:
    layout: dict
    memory: dict  # bytes per rank, by kind
    host_memory: dict  # bytes per rank kept in CPU memory (DeepSpeed offload)
    comm: dict  # bytes sent per optimizer step, by axis
    cp_remote_kv_tokens: int
    gpu_memory: int
    fits: bool
    notes: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.memory.values())

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def sequence_parallel(cfg: Config) -> bool:
    """``parallel.sequence_parallel`` (or the planner's ``--sequence-parallel`` on a build without it)."""
    return bool(getattr(cfg.parallel, "sequence_parallel", False))


def _dtype_bytes(cfg: Config, device: str) -> int:
    return 2 if cfg.train.dtype == "bf16" and device == "cuda" else 4


def activation_bytes(cfg: Config, device: str = "cuda", frame_tokens: int | None = None) -> dict:
    """Per-rank activation memory of one micro-batch (bytes): ``peak`` (during the backward),
    ``kept_after_forward``, one layer's saved set ``per_layer``, a checkpointed layer's input."""
    p, m = cfg.parallel, cfg.model
    layout = representative_layout(cfg, frame_tokens)
    micro = layout.total_tokens  # all sequences of the micro-batch, dispatched together under CP
    tokens = -(-micro // (p.cp * p.cp_chunk_size)) * p.cp_chunk_size if p.cp > 1 else micro
    chunks = max(1, math.ceil(layout.num_chunks / p.cp))
    slices = layout.self_attn_slices() if device == "cpu" and p.cp == 1 else None
    trace = trace_layer(cfg, tokens, chunks, device, slices)
    sp = sequence_parallel(cfg) and p.tp > 1
    per_layer = trace.total - (trace.between - trace.between // p.tp if sp else 0)
    residual = tokens * m.hidden_size * 4 // (p.tp if sp else 1)  # a checkpointed layer keeps its fp32 input
    L = m.num_layers
    step = {"full": 1, "every_k": p.ac_every}.get(p.activation_checkpointing)
    kept = [residual if step and i % step == 0 else per_layer for i in range(L)]
    # the backward of layer i (last to first) holds the kept tensors of layers < i and layer i's
    # whole saved set (rematerialised if it was checkpointed); the highest of these is the peak
    peak = max((sum(kept[:i]) + per_layer for i in range(L)), default=0)
    io = trace_outside_layers(cfg, tokens, chunks)
    return {"peak": peak + io, "kept_after_forward": sum(kept) + io, "per_layer": per_layer,
            "checkpointed_layer": residual, "outside_layers": io, "tokens": tokens}


def cp_remote_kv(cfg: Config, frame_tokens: int | None = None) -> int:
    """The most remote KV tokens a CP rank fetches per layer under the dispatch solver's plan of
    the representative mask (0 without CP)."""
    p = cfg.parallel
    if p.cp == 1:
        return 0
    from magitrain.parallel.dispatch import plan_stats, solve

    slices = representative_layout(cfg, frame_tokens).self_attn_slices()
    plan = solve(slices, p.cp, p.cp_chunk_size, p.cp_solver)
    return plan_stats(plan, slices).max_remote_kv


def make_plan(cfg: Config, gpu_memory: int = 80 * 10 ** 9, device: str = "cuda",
              frame_tokens: int | None = None) -> Plan:
    p, m = cfg.parallel, cfg.model
    model = meta_model(cfg)
    elements = rank_elements(cfg, 0, model)
    local = sum(elements.values())
    act_dtype = _dtype_bytes(cfg, device)
    param_dtype = act_dtype  # FSDP2 all-gathers in bf16 under bf16 mixed precision
    notes = []
    host = {}
    mem = {}
    layer_params = sum(math.prod(tp_local_shape(n, tuple(t.shape), p.tp, m.num_kv_heads))
                       for n, t in model.layers[0].named_parameters())
    layer_params_full = layer_params
    if p.dp_engine == "deepspeed":
        total_local = sum(math.prod(tp_local_shape(n, tuple(t.shape), p.tp, m.num_kv_heads))
                          for n, t in model.named_parameters())
        part = -(-total_local // p.dp)
        mem["parameters"] = (local if p.zero_stage == 3 else total_local) * param_dtype
        mem["gradients"] = (part if p.zero_stage >= 2 else total_local) * 4
        # the EMA follows the fp32 master partition it averages (on the CPU under offload)
        state = {"optimizer_state": part * 8, "fp32_master": part * 4,
                 "ema": part * 4 if cfg.optim.ema_decay > 0 else 0}
        if p.cpu_offload:
            host.update(state)
        else:
            mem.update(state)
        mem["zero3_gathered_layers"] = 2 * layer_params_full * param_dtype if p.zero_stage == 3 else 0
        notes.append("deepspeed: ZeRO flat partitions over dp (cp = tp = 1)")
    else:
        mem["parameters"] = local * 4
        mem["gradients"] = local * 4
        mem["optimizer_state"] = local * 8
        mem["ema"] = local * 4 if cfg.optim.ema_decay > 0 else 0
        mem["fsdp_buffers"] = (2 * layer_params * param_dtype + layer_params * (param_dtype + 4)
                               if p.dp * p.cp > 1 else 0)
    act = activation_bytes(cfg, device, frame_tokens)
    mem["activations"] = act["peak"]
    remote = cp_remote_kv(cfg, frame_tokens)
    kv_local = max(m.num_kv_heads // p.tp, 1) * m.head_dim
    mem["cp_kv_buffers"] = remote * 2 * kv_local * act_dtype * 2  # remote K, V and their gradients

    n, h, L, ga = act["tokens"], m.hidden_size, m.num_layers, cfg.train.grad_accum
    recompute = p.activation_checkpointing != "none"
    ring = lambda world: 2 * (world - 1) / world  # noqa: E731  ring all-reduce: bytes sent per byte reduced
    comm = {}
    if p.tp > 1:
        # forward: attention output (fp32 island) + MLP output; backward: the two column-parallel
        # inputs' gradients; recompute: the forward again
        fwd = n * h * (4 + act_dtype)
        per_layer = fwd * (2 if recompute else 1) + 2 * n * h * act_dtype
        comm["tp"] = int(ga * L * per_layer * ring(p.tp))
    if p.cp > 1:
        kv = remote * 2 * kv_local * act_dtype
        comm["cp"] = int(ga * L * kv * (3 if recompute else 2))  # fetch (+ refetch), gradients back
    shards = p.dp * p.cp if p.dp_engine == "fsdp2" else p.dp
    if shards > 1:
        full = sum(math.prod(tp_local_shape(nm, tuple(t.shape), p.tp, m.num_kv_heads))
                   for nm, t in model.named_parameters())
        frac = (shards - 1) / shards
        comm["fsdp" if p.dp_engine == "fsdp2" else "zero"] = int(ga * full * frac * (2 * param_dtype + 4))
    usable = int(gpu_memory * (1 - RESERVED))
    total = sum(mem.values())
    return Plan({"dp": p.dp, "cp": p.cp, "tp": p.tp, "sequence_parallel": sequence_parallel(cfg),
                 "dp_engine": p.dp_engine, "activation_checkpointing": p.activation_checkpointing,
                 "dtype": cfg.train.dtype, "seq_tokens": cfg.data.seq_tokens, "tokens_per_rank": n,
                 "grad_accum": ga, "device": device},
                mem, host, comm, remote, gpu_memory, total <= usable, notes)


def _gb(b: float) -> str:
    return f"{b / 1e9:8.2f} GB"


def format_plan(plan: Plan, name: str = "") -> str:
    lay = plan.layout
    lines = [f"{name} dp={lay['dp']} cp={lay['cp']} tp={lay['tp']} sp={str(lay['sequence_parallel']).lower()} "
             f"engine={lay['dp_engine']} ac={lay['activation_checkpointing']} dtype={lay['dtype']} "
             f"seq_tokens={lay['seq_tokens']} ({lay['tokens_per_rank']} per rank)".strip(),
             "per-rank memory:"]
    lines += [f"  {k:<24}{_gb(v)}" for k, v in plan.memory.items()]
    lines.append(f"  {'total':<24}{_gb(plan.total)}")
    lines += [f"  host {k:<19}{_gb(v)}" for k, v in plan.host_memory.items()]
    lines.append("communication per step (bytes sent per rank):")
    lines += [f"  {k:<24}{_gb(v)}" for k, v in plan.comm.items()] or ["  none (one rank)"]
    if lay["cp"] > 1:
        lines.append(f"  cp remote KV per layer   {plan.cp_remote_kv_tokens} tokens (dispatch solver)")
    usable = plan.gpu_memory * (1 - RESERVED)
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"verdict: {verdict} in {plan.gpu_memory / 1e9:g} GB ({plan.total / plan.gpu_memory:.0%} of it; "
                 f"usable {usable / 1e9:.0f} GB after {RESERVED:.0%} reserved)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def parse_memory(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB|GiB|MB|MiB|TB)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"--gpu-memory {text!r}: give a size like 80GB or 141GiB")
    unit = (match.group(2) or "GB").lower()
    scale = {"gb": 1e9, "gib": 2 ** 30, "mb": 1e6, "mib": 2 ** 20, "tb": 1e12}[unit]
    return int(float(match.group(1)) * scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m magitrain.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file, e.g. configs/magi1_24b.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. parallel.tp=8")
    parser.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="whose attention kernels' memory to model (default cuda)")
    parser.add_argument("--frame-tokens", type=int, default=None,
                        help="patch tokens per latent frame of the representative video (default: the "
                             f"synthetic data's, or {WEBDATASET_FRAME_TOKENS} = 720x1280)")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="plan with sequence parallel (as parallel.sequence_parallel=true)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    args = parser.parse_args(argv)
    try:
        gpu = parse_memory(args.gpu_memory)
        cfg = load_config(args.config, args.overrides)
        world = cfg.parallel.dp * cfg.parallel.cp * cfg.parallel.tp
        load_config(args.config, args.overrides, world_size=world)  # the layout checks a launch would make
        if cfg.parallel.dp_engine == "deepspeed" and cfg.parallel.cp * cfg.parallel.tp > 1:
            raise ConfigError("parallel.dp_engine=deepspeed shards over data parallel only; use parallel.cp=1 "
                              "and parallel.tp=1")
        if args.frame_tokens is not None and args.frame_tokens < 1:
            raise ConfigError(f"--frame-tokens={args.frame_tokens} must be >= 1")
        if args.sequence_parallel:
            object.__setattr__(cfg.parallel, "sequence_parallel", True)
        plan = make_plan(cfg, gpu, args.device, args.frame_tokens)
    except (ConfigError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
