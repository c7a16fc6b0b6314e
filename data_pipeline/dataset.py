"""The per-worker stream: shards -> raw samples -> seeded shuffle buffer -> prepare -> pack.

:class:`PackedSequences` is an ``IterableDataset`` that yields packed sequences (one
:class:`~magitrain.batch.Batch` each, plus an info dict). It is *Stateful*: ``state_dict()``
describes where the stream stands in a few plain integers and sample references
``[epoch, shard_pos, sample_pos]`` (the samples sitting in the shuffle buffer and in the
packer's open bins), never sample data. ``torchdata``'s ``StatefulDataLoader`` collects this
state from every worker with each batch and hands it back on resume; the stream then re-reads
only the referenced samples (from the few shards they live in) and continues at the saved
shard position, so a resumed run yields exactly the sequences an uninterrupted run would.

Every random choice is a pure function of (seed, epoch, rank, worker, counter) or of the
sample's identity, so nothing else needs saving.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from magitrain.data_pipeline import shard_format as fmt
from magitrain.data_pipeline.buckets import Geometry, Stage
from magitrain.data_pipeline.encoders import build_latent_encoder, build_text_encoder
from magitrain.data_pipeline.packer import Packer, to_batch
from magitrain.data_pipeline.prepare import Prepared, SamplePreparer
from magitrain.data_pipeline.shards import epoch_shards, read_raw
from torch.utils.data import IterableDataset, get_worker_info

log = logging.getLogger("magitrain.data")

COUNTERS = ("samples", "skipped", "filtered", "sequences", "sample_tokens", "total_tokens")


class BadDataError(RuntimeError):
    """Too large a share of the data was unusable (``data.max_bad_fraction``)."""


def check_bad_fraction(samples: int, skipped: int, max_fraction: float, min_samples: int, where: str) -> None:
    if samples >= max(1, min_samples) and skipped > max_fraction * samples:
        raise BadDataError(f"{where}: {skipped} of {samples} samples were bad ({skipped / samples:.1%}), more than "
                           f"data.max_bad_fraction={max_fraction:.1%}; see the 'data: skipped' log lines for "
                           "shards and keys")


@dataclass
class StreamSpec:
    """Everything a worker needs to rebuild its stream (plain data, cheap to send to workers)."""

    urls: list[str]
    stage: Stage
    geo: Geometry
    seed: int
    rank: int
    world: int
    shuffle_buffer: int
    pack_bins: int
    caption_len: int
    caption_dim: int
    max_bad_fraction: float = 1.0
    bad_check_after: int = 20
    manifest_counts: dict = field(default_factory=dict)
    latent_encoder: str = "patch"
    latent_encoder_weights: str = ""
    text_encoder: str = "hash"
    text_encoder_weights: str = ""
    epochs: int | None = None  # None: repeat forever


Ref = tuple[int, int, int]  # (epoch, shard_pos, sample_pos)


class PackedSequences(IterableDataset):
    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self._loaded: dict | None = None
        self._live = None  # the running generator's structures, read by state_dict()

    # -- Stateful -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self._live is None:
            return self._loaded if self._loaded is not None else {}
        pos, counters, buffer, packer, ready = self._live
        return {**pos, "counters": dict(counters),
                "buffer": [list(ref) for ref, _ in buffer],
                "bins": [[list(it[0]) for it, _ in b] for b in packer.bins],
                "ready": [[list(it[0]) for it in seq] for seq in ready]}

    def load_state_dict(self, state: dict) -> None:
        self._loaded = state or None

    # -- the stream ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self._run(worker, num_workers)

    def _shard_url(self, ref_epoch: int, shard_pos: int, worker: int, num_workers: int) -> str:
        s = self.spec
        return epoch_shards(s.urls, s.seed, ref_epoch, s.rank, s.world, worker, num_workers)[shard_pos]

    def _sample_rng(self, epoch: int, raw: dict) -> random.Random:
        return random.Random(f"sample:{self.spec.seed}:{epoch}:{raw['__url__']}:{raw['__key__']}")

    def _run(self, worker: int, num_workers: int):
        s = self.spec
        st = self._loaded or {}
        if st and (st["worker"], st["num_workers"]) != (worker, num_workers):
            raise ValueError(f"loader state of worker {st['worker']}/{st['num_workers']} cannot resume worker "
                             f"{worker}/{num_workers}: keep data.num_workers when resuming")
        pos = {"worker": worker, "num_workers": num_workers, "epoch": st.get("epoch", 0),
               "shard_pos": st.get("shard_pos", 0), "sample_pos": st.get("sample_pos", 0),
               "draws": st.get("draws", 0), "unusable": st.get("unusable", 0)}
        counters = {k: st.get("counters", {}).get(k, 0) for k in COUNTERS}
        def latent_enc():
            return build_latent_encoder(s.latent_encoder, s.geo.channels, s.latent_encoder_weights)
        text_enc = build_text_encoder(s.text_encoder, s.caption_dim, s.caption_len, s.text_encoder_weights)
        prepare = SamplePreparer(s.geo, s.stage, latent_enc, text_enc, s.caption_len, s.caption_dim)
        packer: Packer = Packer(s.stage.seq_tokens, s.pack_bins)
        buffer: list[tuple[Ref, dict]] = []
        ready: list[list[tuple[Ref, Prepared]]] = []
        self._restore(st, worker, num_workers, prepare, buffer, packer, ready, counters)
        self._live = (pos, counters, buffer, packer, ready)
        where = f"data rank {s.rank} worker {worker}"

        def prepared(ref: Ref, raw: dict):
            """Prepare one sample; bad ones are logged, counted and dropped."""
            try:
                out = prepare(raw, self._sample_rng(ref[0], raw))
            except fmt.BadSample as e:
                counters["skipped"] += 1
                log.warning("data: skipped shard=%s key=%s: %s", raw.get("__url__"), raw.get("__key__"), e)
                check_bad_fraction(counters["samples"], counters["skipped"], s.max_bad_fraction,
                                   s.bad_check_after, where)
                pos["unusable"] += 1
                return None
            if out is None:
                counters["filtered"] += 1
            pos["unusable"] = 0 if out is not None else pos["unusable"] + 1
            return out

        def emit():
            while ready:
                seq = ready[0]
                batch = to_batch([p for _, p in seq], s.stage.seq_tokens, s.geo)
                counters["sequences"] += 1
                counters["sample_tokens"] += batch.layout.num_sample_tokens
                counters["total_tokens"] += batch.layout.total_tokens
                ready.pop(0)
                yield batch, {"worker": worker, "keys": [p.key for _, p in seq], "counters": dict(counters)}

        def consume(ref: Ref, raw: dict):
            p = prepared(ref, raw)
            if p is not None:
                ready.extend(packer.add((ref, p), p.num_tokens(s.geo)))
            yield from emit()

        yield from emit()  # sequences closed before the checkpoint but not yet handed out
        for ref, raw in self._raw_stream(pos, counters, worker, num_workers, where):
            if len(buffer) < s.shuffle_buffer:
                buffer.append((ref, raw))
                continue
            j = random.Random(f"pick:{s.seed}:{s.rank}:{worker}:{pos['draws']}").randrange(len(buffer))
            pos["draws"] += 1
            out, buffer[j] = buffer[j], (ref, raw)
            yield from consume(*out)
        while buffer:  # finite runs only: drain the buffer in seeded random order, then the bins
            j = random.Random(f"pick:{s.seed}:{s.rank}:{worker}:{pos['draws']}").randrange(len(buffer))
            pos["draws"] += 1
            yield from consume(*buffer.pop(j))
        ready.extend(packer.flush())
        yield from emit()

    def _raw_stream(self, pos: dict, counters: dict, worker: int, num_workers: int, where: str):
        """Raw samples from the saved position on, epoch after epoch; keeps ``pos`` current."""
        s = self.spec
        while s.epochs is None or pos["epoch"] < s.epochs:
            urls = epoch_shards(s.urls, s.seed, pos["epoch"], s.rank, s.world, worker, num_workers)
            read_before = counters["samples"]
            yielded = 0  # raw samples this epoch handed on (a resume mid-epoch counts the restored ones)
            if pos["shard_pos"] or pos["sample_pos"]:
                yielded = 1
            while pos["shard_pos"] < len(urls):
                url = urls[pos["shard_pos"]]
                errors = []

                def on_error(exn: Exception, errors=errors, url=url) -> bool:
                    errors.append(exn)
                    log.warning("data: shard=%s read error: %s", url, exn)
                    return True

                got = 0
                for got, raw in enumerate(read_raw(url, on_error), start=1):
                    if got <= pos["sample_pos"]:
                        continue  # read before the checkpoint
                    counters["samples"] += 1
                    pos["sample_pos"] = got
                    yielded += 1
                    yield (pos["epoch"], pos["shard_pos"], got - 1), raw
                self._account_shard(url, got, errors, counters, where)
                pos["shard_pos"], pos["sample_pos"] = pos["shard_pos"] + 1, 0
            read_now = counters["samples"] - read_before  # read, or counted lost against the manifest
            if yielded == 0:
                raise BadDataError(f"{where}: epoch {pos['epoch']} of curriculum stage '{s.stage.name}' gave no "
                                   f"readable sample ({read_now} lost in {len(urls)} shard(s)); see the "
                                   "'data: shard=... read error' log lines")
            if pos["unusable"] > read_now + s.shuffle_buffer:
                raise BadDataError(f"{where}: a whole epoch gave no usable sample for curriculum stage "
                                   f"'{s.stage.name}': every sample was bad or fit none of its buckets")
            pos["epoch"], pos["shard_pos"] = pos["epoch"] + 1, 0

    def _account_shard(self, url: str, got: int, errors: list, counters: dict, where: str) -> None:
        """Count samples a damaged shard lost: against the manifest when known, else one per failure."""
        s = self.spec
        expected = s.manifest_counts.get(url.rsplit("/", 1)[-1])
        lost = max(0, expected - got) if expected is not None else (1 if errors else 0)
        if lost:
            counters["samples"] += lost
            counters["skipped"] += lost
            log.warning("data: skipped shard=%s: %d sample(s) unreadable (%s)", url, lost,
                        errors[0] if errors else "fewer samples than the manifest")
            check_bad_fraction(counters["samples"], counters["skipped"], s.max_bad_fraction, s.bad_check_after, where)

    def _restore(self, st: dict, worker: int, num_workers: int, prepare: SamplePreparer,
                 buffer: list, packer: Packer, ready: list, counters: dict) -> None:
        """Re-read the samples the saved state refers to and rebuild buffer, bins and ready queue.

        A sample that can no longer be read (its shard was damaged after the checkpoint) is
        counted as skipped and left out, as it would have been had it been bad when first read.
        """
        if not st:
            return
        refs = [tuple(r) for r in st["buffer"]]
        refs += [tuple(r) for b in st["bins"] + st["ready"] for r in b]
        raws = self._fetch(refs, worker, num_workers)
        lost = {r for r in refs if r not in raws}
        if lost:
            counters["skipped"] += len(lost)
            log.warning("data: %d sample(s) the checkpoint refers to are no longer readable; skipped", len(lost))
            st = {"buffer": [r for r in st["buffer"] if tuple(r) not in lost],
                  "bins": [[r for r in b if tuple(r) not in lost] for b in st["bins"]],
                  "ready": [[r for r in seq if tuple(r) not in lost] for seq in st["ready"]]}
            st["bins"] = [b for b in st["bins"] if b]
            st["ready"] = [seq for seq in st["ready"] if seq]

        def prep(r) -> tuple[Ref, Prepared]:
            r = tuple(r)
            p = prepare(raws[r], self._sample_rng(r[0], raws[r]))
            if p is None:
                raise ValueError(f"sample {r} no longer fits its bucket: the shards or the stage changed since the checkpoint")
            return r, p

        buffer.extend((tuple(r), raws[tuple(r)]) for r in st["buffer"])
        for b in st["bins"]:
            packer.bins.append([(item, item[1].num_tokens(self.spec.geo)) for item in map(prep, b)])
        ready.extend([prep(r) for r in seq] for seq in st["ready"])

    def _fetch(self, refs: list[Ref], worker: int, num_workers: int) -> dict:
        """Raw samples by reference, reading each shard involved once, up to its last needed sample.

        References a shard no longer holds are missing from the result (and logged)."""
        by_shard: dict[tuple[int, int], set[int]] = {}
        for e, i, j in refs:
            by_shard.setdefault((e, i), set()).add(j)
        out = {}
        for (e, i), wanted in sorted(by_shard.items()):
            url = self._shard_url(e, i, worker, num_workers)
            last = max(wanted)
            for j, raw in enumerate(read_raw(url, lambda exn: True)):
                if j in wanted:
                    out[(e, i, j)] = raw
                if j >= last:
                    break
            missing = wanted - {j for (ee, ii, j) in out if (ee, ii) == (e, i)}
            if missing:
                log.warning("data: resume: shard=%s no longer holds samples %s", url, sorted(missing))
        return out
