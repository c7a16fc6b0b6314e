"""Media I/O: decode video/image bytes, resize-and-crop, write mp4. All frames are uint8 ``[T, H, W, 3]``."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from magitrain.data_pipeline.shard_format import IMAGE_EXTS, BadSample


def decode_video(data: bytes, max_frames: int | None = None) -> torch.Tensor:
    """Decode the first ``max_frames`` frames (all when None) of a video file's bytes."""
    import av

    frames = []
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except Exception as e:  # PyAV raises many error types for damaged input  # noqa: BLE001
        raise BadSample(f"undecodable video: {type(e).__name__}: {e}") from None
    if not frames:
        raise BadSample("undecodable video: no frames")
    return torch.from_numpy(np.stack(frames))


def decode_image(data: bytes) -> torch.Tensor:
    """Decode a jpg/png into a one-frame video ``[1, H, W, 3]``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001
        raise BadSample(f"undecodable image: {type(e).__name__}: {e}") from None
    return torch.from_numpy(arr.copy())[None]


def decode_media(data: bytes, ext: str, max_frames: int | None = None) -> torch.Tensor:
    return decode_image(data) if ext in IMAGE_EXTS else decode_video(data, max_frames)


def probe_video(data: bytes) -> dict:
    """``{"frames", "fps", "height", "width"}`` of a video, decoding it fully (validates it too)."""
    import av

    video = decode_video(data)
    try:
        with av.open(io.BytesIO(data)) as container:
            rate = container.streams.video[0].average_rate
            fps = float(rate) if rate else 0.0
    except Exception as e:  # noqa: BLE001
        raise BadSample(f"undecodable video: {e}") from None
    return {"frames": video.shape[0], "fps": fps, "height": video.shape[1], "width": video.shape[2]}


def resize_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale ``[T, H, W, 3]`` uint8 so it covers ``height x width`` (aspect kept), then centre-crop."""
    _, h, w, _ = video.shape
    if (h, w) == (height, width):
        return video
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    x = video.permute(0, 3, 1, 2).float()
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def encode_mp4(video: torch.Tensor, fps: int = 8, codec: str = "libx264") -> bytes:
    """Encode ``[T, H, W, 3]`` uint8 (H, W even) as an mp4; ``libx264`` with crf 0 is near-lossless."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = int(video.shape[1]), int(video.shape[2])
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "0", "preset": "ultrafast"}
        for frame in video.numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def write_mp4(path: str, video: torch.Tensor, fps: int = 8) -> None:
    with open(path, "wb") as f:
        f.write(encode_mp4(video, fps))
