"""Run logging: ``metrics.jsonl`` (one JSON object per step), TensorBoard, a progress bar, and
optionally Weights & Biases (``log.wandb``; the ``wandb`` extra; offline by default, so it needs no
network: the run is written under ``run.dir/wandb/`` and ``wandb sync`` uploads it later).

``metrics.jsonl`` fields are a public contract: every line has at least ``step``, ``loss``,
``grad_norm``, ``lr`` and ``tokens_per_s``; further keys are added, never renamed.
Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os

from tqdm import tqdm


def open_wandb(run_dir: str, project: str, mode: str, name: str = "", config: dict | None = None):
    """A wandb run whose files live in ``run_dir/wandb/``; ``mode='offline'`` never touches the network."""
    import wandb

    return wandb.init(project=project, name=name or os.path.basename(os.path.abspath(run_dir)), dir=run_dir,
                      mode=mode, config=config or {}, settings=wandb.Settings(console="off", silent=True))


class MetricsLogger:
    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, progress: bool = True, wandb_run=None):
        """``wandb_run``: a run from :func:`open_wandb` (rank 0 only), or None."""
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.wandb = wandb_run if enabled else None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.dropped = self._truncate_after(start_step)
        self.file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _truncate_after(self, start_step: int) -> int:
        """On resume, drop lines of steps after the checkpoint (they will be redone), and lines that
        are not JSON (a line torn by a crash or a full disk); returns how many were torn."""
        if not os.path.exists(self.path):
            return 0
        keep, torn = [], 0
        with open(self.path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    torn += 1
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= start_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)
        if torn:
            print(f"{self.path}: dropped {torn} torn line(s) (not JSON; a crash mid-write)")
        return torn

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        step = record["step"]
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in clean.items()
                            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}, step=step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()
