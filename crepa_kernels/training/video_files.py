"""Video files for the feature cache's command line: finding them in a folder and decoding them with PyAV."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def list_videos(folder: str | Path) -> list[tuple[str, Path]]:
    """(sample id, path) of every video file below ``folder``, sorted; the id is the path relative to ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"videos: expected a folder of video files, got {str(folder)!r}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    return [(path.relative_to(folder).as_posix(), path) for path in paths]


def read_video(path: str | Path, num_frames: int | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """The first ``num_frames`` frames (all without it) of a video file as [3, F, H, W] fp32 in [0, 1], resized to
    ``size`` = (H, W) (bilinear, antialiased) when given: the frames the DiT's latents were made from."""
    import av  # PyAV: FFmpeg's decoders

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if num_frames is not None and len(frames) == num_frames:
                break
    if not frames or (num_frames is not None and len(frames) < num_frames):
        raise ValueError(f"{path}: {len(frames)} decodable frames, expected at least {num_frames or 1}")
    video = torch.stack(frames).permute(0, 3, 1, 2).float() / 255  # [F, 3, H, W]
    if size is not None and tuple(video.shape[-2:]) != tuple(size):
        video = F.interpolate(video, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return video.transpose(0, 1).contiguous()
