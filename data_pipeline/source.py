"""The trainer-facing WebDataset source: curriculum stages over a ``StatefulDataLoader``.

``next_batch()`` returns this DP rank's batch for the next call: ``data.batch_size // (dp_size x
train.grad_accum)`` packed sequences of the current stage's ``seq_tokens`` each, concatenated.
The curriculum position is the optimizer step (calls // grad_accum); at a stage boundary the
loader of the old stage is dropped and one for the new stage is built (logged). The state is
``{step, calls, stage, loader state, counters}``: plain dicts, lists, ints and strings, so it
goes through ``torch.save`` / ``torch.load(weights_only=True)`` and DCP.
"""

from __future__ import annotations

import functools
import logging
import warnings

from magitrain.data_pipeline.buckets import Geometry, Stage, resolve_stages, stage_index_at
from magitrain.data_pipeline.dataset import COUNTERS, PackedSequences, StreamSpec, check_bad_fraction
from magitrain.data_pipeline.encoders import latent_factors
from magitrain.data_pipeline.shards import check_split, expand_shards, load_manifest_counts
from torchdata.stateful_dataloader import StatefulDataLoader

from magitrain.batch import Batch
from magitrain.config import Config, ConfigError
from magitrain.parallel.solve_ahead import AheadSpec, solve_for_batch

log = logging.getLogger("magitrain.data")


def collate(items: list[tuple[Batch, dict]], ahead: AheadSpec | None = None) -> tuple[Batch, list[dict]]:
    """One DP rank's batch; with ``ahead``, its CP dispatch is solved here, in the loader worker
    (solve-ahead, :mod:`magitrain.parallel.solve_ahead`), off the step's critical path."""
    batch = Batch.concat([b for b, _ in items])
    if ahead is not None:
        batch.dispatch = solve_for_batch(batch.layout.self_attn_slices(), ahead)
    return batch, [info for _, info in items]


def geometry(cfg: Config) -> Geometry:
    m, d = cfg.model, cfg.data
    tf, sf = latent_factors(d.latent_encoder, m.in_channels, d.latent_encoder_weights)
    return Geometry(m.t_patch_size, m.patch_size, m.chunk_frames, m.in_channels, tf, sf, m.sink_chunks,
                    m.max_context_chunks)


class WebDatasetSource:
    """:class:`~magitrain.batch.DataSource` over WebDataset shards (see module doc)."""

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, epochs: int | None = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        d = cfg.data
        self.cfg, self.rank, self.world, self.epochs = cfg, dp_rank, dp_size, epochs
        self.grad_accum = cfg.train.grad_accum
        self.local_batch = d.batch_size // (dp_size * self.grad_accum)
        if self.local_batch < 1 or d.batch_size % (dp_size * self.grad_accum):
            raise ConfigError(f"data.batch_size={d.batch_size} must be a positive multiple of dp x train.grad_accum "
                              f"= {dp_size} x {self.grad_accum}")
        self.geo = geometry(cfg)
        self.stages = resolve_stages(cfg, self.geo)
        self.urls = {}
        for st in self.stages:  # every stage's shards are checked at start-up
            if st.shards not in self.urls:
                urls = expand_shards(st.shards)
                check_split(urls, dp_size, d.num_workers)
                self.urls[st.shards] = urls
        self.step, self.calls = 0, 0
        self.stage = stage_index_at(self.stages, 0)
        self._loader: StatefulDataLoader | None = None
        self._it = None
        self._pending_state: dict | None = None
        self._done = {k: 0 for k in COUNTERS}  # counters of finished stages
        self._workers: dict[str, dict] = {}  # latest counters per worker of the current stage
        self._last_padding = 0.0
        self.solve_ahead: AheadSpec | None = None  # set before the first batch: plans solved in the loader

    # -- loader lifecycle ------------------------------------------------------------------------
    def _spec(self, stage: Stage) -> StreamSpec:
        c, d, m = self.cfg, self.cfg.data, self.cfg.model
        urls = self.urls[stage.shards]
        return StreamSpec(urls=urls, stage=stage, geo=self.geo, seed=c.train.seed + 1000003 * stage.index,
                          rank=self.rank, world=self.world, shuffle_buffer=d.shuffle_buffer, pack_bins=d.pack_bins,
                          caption_len=m.caption_max_length, caption_dim=m.caption_channels,
                          max_bad_fraction=d.max_bad_fraction, bad_check_after=d.bad_check_after,
                          manifest_counts=load_manifest_counts(urls, d.manifest),
                          latent_encoder=d.latent_encoder, latent_encoder_weights=d.latent_encoder_weights,
                          text_encoder=d.text_encoder, text_encoder_weights=d.text_encoder_weights,
                          epochs=self.epochs)

    def _open(self) -> None:
        stage = self.stages[self.stage]
        nw = self.cfg.data.num_workers
        with warnings.catch_warnings():  # torchdata 0.11 calls the deprecated torch.set_vital
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self._loader = StatefulDataLoader(PackedSequences(self._spec(stage)), batch_size=self.local_batch,
                                              num_workers=nw,
                                              collate_fn=functools.partial(collate, ahead=self.solve_ahead),
                                              multiprocessing_context="fork" if nw > 0 else None)
        if self._pending_state:
            self._loader.load_state_dict(self._pending_state)
        self._pending_state = None
        self._it = iter(self._loader)

    def _switch_to(self, index: int) -> None:
        old = self.stages[self.stage]
        for k in COUNTERS:
            self._done[k] += sum(w[k] for w in self._workers.values())
        self._workers, self._loader, self._it, self._pending_state = {}, None, None, None
        self.stage = index
        log.info("data: curriculum stage '%s' -> '%s' at step %d", old.name, self.stages[index].name, self.step)

    def close(self) -> None:
        self._it, self._loader = None, None

    # -- DataSource --------------------------------------------------------------------------------
    def next_batch(self) -> Batch:
        want = stage_index_at(self.stages, self.step)
        if want != self.stage:
            self._switch_to(want)
        if self._it is None:
            self._open()
        batch, infos = next(self._it)
        for info in infos:
            self._workers[str(info["worker"])] = info["counters"]
        batch.sample_ids = [i * self.world + self.rank for i in range(len(batch.layout.samples))]
        self._last_padding = 1.0 - batch.layout.num_sample_tokens / batch.layout.total_tokens
        totals = self._totals()
        check_bad_fraction(totals["samples"], totals["skipped"], self.cfg.data.max_bad_fraction,
                           self.cfg.data.bad_check_after, f"data rank {self.rank}")
        self.calls += 1
        if self.calls % self.grad_accum == 0:
            self.step += 1
        return batch

    def _totals(self) -> dict:
        return {k: self._done[k] + sum(w[k] for w in self._workers.values()) for k in COUNTERS}

    def stats(self) -> dict:
        t = self._totals()
        return {"data_skipped": t["skipped"], "data_samples": t["samples"], "data_filtered": t["filtered"],
                "padding_frac": self._last_padding,
                "padding_frac_mean": 1.0 - t["sample_tokens"] / t["total_tokens"] if t["total_tokens"] else 0.0,
                "stage": self.stages[self.stage].name, "data_stage": self.stage}

    def state_dict(self) -> dict:
        if self._loader is not None:
            loader = self._loader.state_dict()
        else:
            loader = self._pending_state or {}
        return {"step": self.step, "calls": self.calls, "stage": self.stage, "dp_rank": self.rank, "dp_size": self.world,
                "stage_name": self.stages[self.stage].name, "loader": loader,
                "done": dict(self._done), "workers": {k: dict(v) for k, v in self._workers.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream where ``state`` (saved by the same dp rank of a run with the same dp
        size) left it. A changed dp size is refused (ConfigError): the interrupted epoch's remaining
        samples sit in per-rank shard positions, shuffle buffers and packer bins that cannot be
        re-split over another number of ranks without repeating or dropping samples."""
        saved_dp = state.get("dp_size")  # absent in checkpoints from before issue 14: not checkable
        if saved_dp is not None and int(saved_dp) != self.world:
            raise ConfigError(f"the checkpoint's WebDataset stream was split over {saved_dp} data-parallel ranks, this "
                              f"run has parallel.dp={self.world}: resuming would repeat or drop samples of the "
                              f"interrupted epoch; resume with parallel.dp={saved_dp} (cp and tp may change), or "
                              "start a new run from its weights with ckpt.init_from=<checkpoint>")
        if saved_dp is not None and int(state["dp_rank"]) != self.rank:
            raise ConfigError(f"data-parallel rank {self.rank} was handed the data state of dp rank {state['dp_rank']}: "
                              "two ranks would read the same samples")
        if state["stage"] >= len(self.stages) or state["stage_name"] != self.stages[state["stage"]].name:
            raise ValueError(f"data state is for curriculum stage {state['stage']} '{state['stage_name']}', "
                             f"which this config does not have at that position")
        self.close()
        self.step, self.calls, self.stage = state["step"], state["calls"], state["stage"]
        self._done = dict(state["done"])
        self._workers = {k: dict(v) for k, v in state["workers"].items()}
        self._pending_state = state["loader"] or None


def build_webdataset_source(cfg: Config, dp_rank: int, dp_size: int) -> WebDatasetSource:
    """The ``data.source=webdataset`` source for one data-parallel rank."""
    return WebDatasetSource(cfg, dp_rank, dp_size)
