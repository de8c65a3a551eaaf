"""Encode a folder of video files into an offline feature cache (crepa_kernels.training.feature_cache).

Each video (decoded with PyAV; searched recursively, the sample id is its path relative to the folder) is cut to
its first ``--frames`` frames and resized to ``--size``, as for the latent cache; the DiT's token grid follows from
those, the VAE's ratios and the DiT's patch size. Run it again to resume an interrupted build.

    python -m crepa_kernels.training.encode_videos --videos clips/ --out features/ --encoder facebook/dinov2-base \
        --frames 81 --size 480x832 --temporal-ratio 4 --spatial-ratio 8 --patch-size 1,2,2 --dtype bf16
"""
from __future__ import annotations

import argparse
import sys

import torch

from .encoders import load_encoder
from .feature_cache import STORAGE_DTYPES, build_feature_cache
from .token_grid import dit_token_grid, latent_frame_count
from .video_files import VIDEO_SUFFIXES, list_videos, read_video


def _int_tuple(text: str, separator: str, count: int) -> tuple[int, ...]:
    """``count`` positive ints separated by ``separator``; argparse names the flag in its error."""
    parts = text.lower().split(separator)
    if len(parts) != count or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected {count} positive ints separated by {separator!r}, got {text!r}")
    return tuple(int(part) for part in parts)


def _resolution(text: str) -> int | str | tuple[int, ...]:
    if text == "token_grid":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    try:
        return _int_tuple(text, "x", 2)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a shorter side in pixels, HxW or token_grid, got {text!r}") \
            from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crepa_kernels.training.encode_videos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", required=True, help="folder of video files (searched recursively)")
    parser.add_argument("--out", required=True, help="cache folder (created; an interrupted build resumes)")
    parser.add_argument("--encoder", required=True,
                        help="checkpoint name or folder (DINOv2, DINOv3, V-JEPA 2), or random:MODEL_TYPE[:SEED]")
    parser.add_argument("--frames", type=int, required=True, help="pixel frames per video: 1 + k * temporal ratio")
    parser.add_argument("--size", required=True, type=lambda text: _int_tuple(text, "x", 2),
                        help="HxW the videos are resized to, as for the latent cache")
    parser.add_argument("--temporal-ratio", type=int, default=4, help="the VAE's (4: Wan, CogVideoX; 8: LTX)")
    parser.add_argument("--spatial-ratio", type=int, default=8, help="the VAE's (8 for Wan, CogVideoX; 32: LTX)")
    parser.add_argument("--patch-size", default="1,2,2", type=lambda text: _int_tuple(text, ",", 3),
                        help="the DiT's (p_t, p_h, p_w)")
    parser.add_argument("--temporal-mode", default="mean", choices=("mean", "subsample"))
    parser.add_argument("--resolution", type=_resolution,
                        help="encoder input: shorter side, HxW, or token_grid (default: its own)")
    parser.add_argument("--dtype", default="bf16", choices=tuple(STORAGE_DTYPES), help="storage dtype")
    parser.add_argument("--chunk-size", type=int, default=16, help="frames (V-JEPA 2: videos) per encoder forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    height, width = args.size
    if height % args.spatial_ratio or width % args.spatial_ratio:
        parser.error(f"--size {height}x{width}: not a multiple of --spatial-ratio {args.spatial_ratio}")
    try:
        latent = (latent_frame_count(args.frames, args.temporal_ratio), height // args.spatial_ratio,
                  width // args.spatial_ratio)
        token_grid = dit_token_grid(latent, args.patch_size)
    except ValueError as error:  # a frame count or patch size the VAE and the DiT cannot take
        parser.error(f"--frames {args.frames}, --size {height}x{width}, --patch-size "
                     f"{','.join(map(str, args.patch_size))}: {error}")
    options = {"temporal_patch": args.patch_size[0], "temporal_mode": args.temporal_mode,
               "chunk_size": args.chunk_size}
    if args.resolution:
        options["resolution"] = args.resolution
    adapter = load_encoder(args.encoder, temporal_ratio=args.temporal_ratio, **options).to(args.device)
    videos = list_videos(args.videos)
    if not videos:
        parser.error(f"--videos {args.videos}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    samples = [(sample_id, lambda path=path: read_video(path, args.frames, (height, width)))
               for sample_id, path in videos]
    counts = build_feature_cache(args.out, samples, adapter, token_grid, storage_dtype=STORAGE_DTYPES[args.dtype],
                                 extra={"frames": args.frames, "size": [height, width]},
                                 progress=not args.no_progress)
    print(f"{args.out}: {counts['written']} written, {counts['skipped']} already cached, token grid {token_grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
