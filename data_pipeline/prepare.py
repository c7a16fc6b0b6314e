"""Raw shard sample -> :class:`Prepared` sample: a latent cut to its bucket plus its caption embedding.

Latent shards are cropped; raw-media shards are decoded, resized/cropped to the bucket's pixel
size and encoded on the fly with the configured latent encoder. Captions use the shard's
``text_emb.npy`` when present, else the configured text encoder. All randomness comes from the
sample's own RNG (seeded by run seed, epoch and sample identity), so a replay is identical.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from magitrain.data_pipeline import shard_format as fmt
from magitrain.data_pipeline.buckets import Geometry, Stage, choose_cut
from magitrain.data_pipeline.encoders import LatentEncoder
from magitrain.data_pipeline.media import decode_media, resize_crop
from magitrain.data_pipeline.text import TextEncoder


@dataclass
class Prepared:
    """One sample ready for packing. ``latent``: float32 ``[C, f, h, w]`` (latent units)."""

    key: str
    latent: torch.Tensor
    chunk_frames: int  # token frames per chunk (1 for images)
    text_emb: torch.Tensor  # [L, D]
    text_mask: torch.Tensor  # [L]
    caption: str

    def grid(self, geo: Geometry) -> tuple[int, int, int, int]:
        _, f, h, w = self.latent.shape
        return f // geo.t_patch, h // geo.patch, w // geo.patch, self.chunk_frames

    def num_tokens(self, geo: Geometry) -> int:
        f, h, w, _ = self.grid(geo)
        return f * h * w


class SamplePreparer:
    """``latent_encoder`` is a factory: it is built on first use, so latent-only shards never load it."""

    def __init__(self, geo: Geometry, stage: Stage, latent_encoder: Callable[[], LatentEncoder],
                 text_encoder: TextEncoder, caption_len: int, caption_dim: int):
        self.geo, self.stage = geo, stage
        self._latent_encoder_factory, self._latent_encoder = latent_encoder, None
        self.text_encoder = text_encoder
        self.caption_len, self.caption_dim = caption_len, caption_dim

    @property
    def latent_encoder(self) -> LatentEncoder:
        if self._latent_encoder is None:
            self._latent_encoder = self._latent_encoder_factory()
        return self._latent_encoder

    def __call__(self, raw: dict, rng: random.Random) -> Prepared | None:
        """Raise :class:`~shard_format.BadSample` on bad data; None when the sample fits no bucket."""
        fmt.check_fields(raw)
        meta = fmt.load_json(raw[fmt.META])
        caption = fmt.load_text(raw[fmt.CAPTION]) if fmt.CAPTION in raw else ""
        if fmt.LATENT in raw:
            out = self._from_latent(raw, meta, rng)
        else:
            out = self._from_media(raw, meta, rng)
        if out is None:
            return None
        latent, cut = out
        emb, mask = self._caption(raw, caption)
        cf = 1 if cut.as_image else self.geo.chunk_frames
        return Prepared(raw["__key__"], latent, cf, emb, mask, caption)

    def _from_latent(self, raw: dict, meta: dict, rng: random.Random):
        dtype = meta.get("latent_dtype", "float16")
        if dtype not in fmt.LATENT_DTYPES:
            raise fmt.BadSample(f"json latent_dtype={dtype!r} is not one of {fmt.LATENT_DTYPES}")
        latent = fmt.latent_from_npy(raw[fmt.LATENT], dtype)
        c, t, h, w = latent.shape
        if c != self.geo.channels:
            raise ValueError(f"shard latents have {c} channels but model.in_channels={self.geo.channels} "
                             f"(sample {raw['__key__']} of {raw.get('__url__')})")
        cut = choose_cut(self.stage, self.geo, (t, h, w), t == 1, False, rng, self.stage.seq_tokens)
        if cut is None:
            return None
        top, left = (h - cut.height) // 2, (w - cut.width) // 2
        return latent[:, cut.start:cut.start + cut.frames, top:top + cut.height, left:left + cut.width].contiguous(), cut

    def _from_media(self, raw: dict, meta: dict, rng: random.Random):
        ext = fmt.media_field(raw)
        enc = self.latent_encoder
        tf, sf = enc.temporal_factor, enc.spatial_factor
        is_image = ext in fmt.IMAGE_EXTS
        try:
            n_pix, height, width = (1 if is_image else int(meta["frames"])), int(meta["height"]), int(meta["width"])
        except (KeyError, TypeError, ValueError) as e:
            raise fmt.BadSample(f"json lacks media size fields (frames, height, width): {e}") from None
        avail = (1 if is_image else n_pix // tf, height // sf, width // sf)
        cut = choose_cut(self.stage, self.geo, avail, is_image, True, rng, self.stage.seq_tokens)
        if cut is None:
            return None
        first = cut.start * tf
        n_frames = 1 if cut.as_image else cut.frames * tf
        video = decode_media(raw[ext], ext, max_frames=None if is_image else first + n_frames)
        video = video[first:first + n_frames]
        if video.shape[0] < n_frames:
            raise fmt.BadSample(f"video has {first + video.shape[0]} frames, json says {n_pix}")
        video = resize_crop(video, cut.height * sf, cut.width * sf)
        latent = enc.encode(video)[:, :cut.frames]
        return latent.float().contiguous(), cut

    def _caption(self, raw: dict, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        L, D = self.caption_len, self.caption_dim
        if fmt.TEXT_EMB in raw:
            arr = fmt.load_npy(raw[fmt.TEXT_EMB], fmt.TEXT_EMB)
            if arr.ndim != 2 or arr.dtype.kind != "f":
                raise fmt.BadSample(f"{fmt.TEXT_EMB} must be a float [L, D] array, got {arr.dtype} {list(arr.shape)}")
            if arr.shape[1] != D:
                raise ValueError(f"shard text embeddings are {arr.shape[1]} wide but model.caption_channels={D} "
                                 f"(sample {raw['__key__']} of {raw.get('__url__')})")
            n = min(arr.shape[0], L)
            emb = torch.zeros(L, D)
            emb[:n] = torch.from_numpy(arr[:n].astype("float32"))
            mask = torch.zeros(L, dtype=torch.bool)
            mask[:n] = True
            return emb, mask
        emb, mask = self.text_encoder.embed(caption)
        if emb.shape != (L, D):
            raise ValueError(f"text encoder returned {list(emb.shape)}, expected [{L}, {D}] "
                             "(model.caption_max_length x model.caption_channels)")
        return emb.float(), mask.bool()
