"""Throughput accounting for the trainer: model FLOPs on the real masked attention area, MFU,
the context-parallel dispatch figures, and one summary per curriculum stage.

FLOPs of one optimizer step (forward + backward, the usual "6 N D" convention plus attention):

    FLOPs = 6 * params * tokens + 12 * num_layers * head_dim * num_heads * masked_area

``tokens``: tokens of the global batch (all dp ranks and micro-batches, padding included: it is
computed); ``masked_area``: the number of allowed (query, key) pairs of the packed block-causal
self-attention mask, summed over the global batch, NOT a dense ``N^2``. The 12 is 4 FLOPs per
pair and head-dimension (QK^T and PV, 2 each) times 3 (forward + 2x backward).
Cross-attention to the caption (``caption_max_length`` keys per token) and activation
recomputation are not counted. ``mfu = FLOPs / step_time / (peak_flops x world_size)``.

``log.peak_flops`` (per device, FLOP/s) is the peak MFU is measured against; 0 picks a default
by device: the dense bf16 tensor-core peak for known NVIDIA GPUs, and a nominal 1e11 FLOP/s
per CPU process (a few AVX2 cores; set the key for a meaningful CPU figure).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from magitrain.config import ModelConfig

# dense bf16 tensor-core peaks (FLOP/s), matched as substrings of torch.cuda.get_device_name()
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                  "L40S": 362e12, "A10G": 125e12, "4090": 165e12, "V100": 125e12}
CPU_PEAK_FLOPS = 1e11
UNKNOWN_GPU_PEAK_FLOPS = 100e12


def default_peak_flops(device: torch.device) -> float:
    """The per-device peak used when ``log.peak_flops`` is 0 (see the module docstring)."""
    if device.type != "cuda":
        return CPU_PEAK_FLOPS
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), UNKNOWN_GPU_PEAK_FLOPS)


def count_params(model: torch.nn.Module) -> int:
    """Parameters of the whole (unsharded) model: a DTensor's ``numel`` is its global size."""
    return sum(p.numel() for p in model.parameters())


def step_flops(params: int, tokens: int, masked_area: int, m: ModelConfig) -> float:
    """Training FLOPs of one step (module docstring)."""
    return 6.0 * params * tokens + 12.0 * m.num_layers * m.head_dim * m.num_heads * masked_area


def masked_area(batches) -> int:
    """Allowed (query, key) pairs of the block-causal self-attention masks of ``batches``."""
    return sum(b.layout.self_attn_slices().area() for b in batches)


def cp_figures(stats: list) -> dict:
    """metrics.jsonl keys from the dispatch plans of one step's micro-batches
    (:class:`~magitrain.parallel.dispatch.PlanStats`, one per forward); {} without CP."""
    if not stats:
        return {}
    area = [sum(s.area[r] for s in stats) for r in range(len(stats[0].area))]
    remote = [sum(s.remote_kv_tokens[r] for s in stats) for r in range(len(stats[0].area))]
    mean = sum(area) / len(area)
    return {"cp_area_per_rank": area, "cp_area_imbalance": max(area) / mean if mean else 1.0,
            "cp_remote_kv_tokens": remote, "cp_remote_kv_tokens_max": max(remote),
            "cp_solve_s": sum(getattr(s, "solve_s", 0.0) for s in stats)}


@dataclass
class _Stage:
    name: str
    first_step: int
    steps: int = 0
    time_s: float = 0.0
    data_time_s: float = 0.0
    tokens: int = 0
    flops: float = 0.0
    imbalance_sum: float = 0.0
    remote_kv: list = field(default_factory=list)
    skipped_at_start: int = 0
    skipped: int = 0


class StageSummary:
    """Accumulates the per-step records of each curriculum stage; at a stage switch and at the
    end, :meth:`update` / :meth:`finish` return a one-line summary and append it to
    ``run_dir/stages.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: str, peak_total: float, enabled: bool, start_step: int = 0, skipped_before: int = 0):
        self.path = os.path.join(run_dir, "stages.jsonl")
        self._skipped_seen = skipped_before  # data_skipped before the next record's step (a stage starts from it)
        self.peak_total, self.enabled = peak_total, enabled
        self.cur: _Stage | None = None
        if enabled and os.path.exists(self.path):  # a resume redoes the steps after its checkpoint
            rows = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:  # a torn line (crash mid-write): dropped
                        continue
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows if r["first_step"] + r["steps"] - 1 <= start_step)

    def update(self, record: dict) -> str | None:
        """Add one step's record; returns the finished stage's summary line at a switch."""
        name = str(record.get("stage", "default"))
        done = None
        if self.cur is not None and self.cur.name != name:
            done = self._close()
        if self.cur is None:
            self.cur = _Stage(name, record["step"], skipped_at_start=self._skipped_seen)
        s = self.cur
        s.steps += 1
        s.time_s += record["step_time_s"]
        s.data_time_s += record.get("data_time_s", 0.0)
        s.tokens += int(record["tokens_per_s"] * record["step_time_s"] + 0.5)
        s.flops += record.get("model_flops", 0.0)
        s.imbalance_sum += record.get("cp_area_imbalance", 1.0)
        remote = record.get("cp_remote_kv_tokens", [])
        s.remote_kv = [a + b for a, b in zip(s.remote_kv, remote)] if s.remote_kv else list(remote)
        self._skipped_seen = int(record.get("data_skipped", 0))
        s.skipped = self._skipped_seen - s.skipped_at_start
        return done

    def finish(self) -> str | None:
        return self._close() if self.cur is not None else None

    def _close(self) -> str:
        s, self.cur = self.cur, None
        row = {"stage": s.name, "first_step": s.first_step, "steps": s.steps, "time_s": round(s.time_s, 3),
               "tokens_per_s": s.tokens / s.time_s if s.time_s else 0.0,
               "data_time_frac": s.data_time_s / s.time_s if s.time_s else 0.0,
               "mfu": s.flops / s.time_s / self.peak_total if s.time_s and self.peak_total else 0.0,
               "cp_area_imbalance": s.imbalance_sum / s.steps,
               "cp_remote_kv_tokens_per_step": [r / s.steps for r in s.remote_kv], "data_skipped": s.skipped}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        remote = "/".join(f"{r:.0f}" for r in row["cp_remote_kv_tokens_per_step"]) or "-"
        return (f"stage '{s.name}': {s.steps} steps in {s.time_s:.1f} s, {row['tokens_per_s']:.0f} tokens/s, "
                f"MFU {100 * row['mfu']:.2f}%, attention-area imbalance {row['cp_area_imbalance']:.3f}, "
                f"remote KV tokens/step per CP rank {remote}, data {100 * row['data_time_frac']:.1f}% of time, "
                f"{s.skipped} samples skipped")
