"""Shard lists: expansion, start-up checks, the manifest, per-epoch assignment and raw reading.

Tar reading, URL and ``pipe:`` opening and sample grouping are webdataset's
(``tarfile_to_samples``); this module only decides which shards a (DP rank, loader worker)
reads in an epoch and counts samples a damaged shard lost (against the manifest).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence

import webdataset as wds

log = logging.getLogger("magitrain.data")

MANIFEST = "manifest.json"


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Brace-expand ``spec`` (``::`` separates lists; a directory means the shards its
    ``manifest.json`` lists, or its ``*.tar`` when it has none); a list of specs
    (``data.shards=[a.tar,b.tar]``) is each of them expanded, in order.

    Local paths must exist: a missing one fails here, at start-up, naming it. A ``*.tar`` in a
    folder that its manifest does not list (a stale shard of an older build) is an error too.
    """
    urls = []
    for one in ([spec] if isinstance(spec, str) else spec):
        for url in wds.shardlists.expand_urls(one):
            if is_local(url) and os.path.isdir(url):
                urls.extend(folder_shards(url))
            else:
                urls.append(url)
    shown = spec if isinstance(spec, str) else list(spec)
    if not urls:
        raise FileNotFoundError(f"data.shards={shown!r} names no shards")
    missing = [u for u in urls if is_local(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more} (data.shards={shown!r})")
    return urls


def folder_shards(folder: str) -> list[str]:
    """The shards of a local folder: those its manifest lists (every one must exist, no other
    ``*.tar`` may be there), or every ``*.tar`` when the folder has no manifest."""
    tars = sorted(glob.glob(os.path.join(folder, "*.tar")))
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest):
        return tars
    try:
        with open(manifest) as f:
            listed = [os.path.join(folder, e["name"]) for e in json.load(f).get("shards", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{manifest}: cannot be read ({type(e).__name__}: {e})") from None
    extra = sorted(set(tars) - set(listed))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"{folder}: {os.path.basename(extra[0])}{more} is not listed in {MANIFEST} (a stale shard "
                         "of an older build?); remove it or rebuild the folder with build_shards --overwrite")
    return listed


def load_manifest_counts(urls: list[str], manifest: str = "") -> dict[str, int]:
    """Expected samples per shard basename, from ``manifest`` or ``manifest.json`` next to local shards."""
    paths = [manifest] if manifest else sorted({os.path.join(os.path.dirname(u), MANIFEST) for u in urls if is_local(u)})
    counts = {}
    for p in paths:
        if not os.path.isfile(p):
            if manifest:
                raise FileNotFoundError(f"data.manifest not found: {p}")
            continue
        with open(p) as f:
            for entry in json.load(f).get("shards", []):
                counts[entry["name"]] = int(entry["samples"])
    return counts


def epoch_shards(urls: list[str], seed: int, epoch: int, rank: int, world: int, worker: int,
                 num_workers: int) -> list[str]:
    """This (rank, worker)'s shards for ``epoch``: a seeded permutation split by rank, then worker.

    Each shard of an epoch goes to exactly one (rank, worker).
    """
    order = list(urls)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order[rank::world][worker::num_workers]


def check_split(urls: list[str], world: int, num_workers: int) -> None:
    need = world * max(1, num_workers)
    if len(urls) < need:
        raise ValueError(f"{len(urls)} shards cannot feed {world} data-parallel ranks x {max(1, num_workers)} "
                         f"loader workers: every reader needs at least one shard (write more, smaller shards "
                         "with build_shards --max-shard-samples, or lower data.num_workers)")


def read_raw(url: str, on_error: Callable[[Exception], bool]) -> Iterator[dict]:
    """Raw samples of one shard (``__key__``, ``__url__`` and undecoded bytes per extension)."""
    return wds.tarfile_to_samples(handler=on_error)(iter([{"url": url}]))
