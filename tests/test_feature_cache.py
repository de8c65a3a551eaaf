"""The offline feature cache (crepa_kernels.training.feature_cache): round trip, a crash in the middle of a write
(a killed process and an injected error), resume, fingerprint mismatches, DataLoader workers, and the command line
on video files the test writes with PyAV. Encoders are small random transformers models; nothing is downloaded."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from crepa_kernels.training.encoders import adapter_for, random_encoder  # noqa: E402
from crepa_kernels.training.feature_cache import (  # noqa: E402
    MANIFEST,
    CachedFeatures,
    FeatureCache,
    MissingFeatureError,
    StaleFeatureError,
    build_feature_cache,
    entry_filename,
)
from crepa_kernels.training.encode_videos import main as encode_videos_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GRID = (3, 5, 8)  # the DiT's F', H', W' for 9 frames of 80x128 under Wan's VAE (4x, 8x) and patch (1, 2, 2)


def _adapter(seed=0, **kwargs):
    return adapter_for(random_encoder("dinov2", seed=seed), temporal_ratio=4, **kwargs)


def _samples(count=4, frames=9, height=40, width=64):
    """(id, [3, F, H, W] video) pairs; ids with characters a file name cannot hold."""
    generator = torch.Generator().manual_seed(11)
    return [(f"clips/take {i}:a", torch.rand(3, frames, height, width, generator=generator)) for i in range(count)]


def test_round_trip_fp32_and_bf16(tmp_path):
    adapter, samples = _adapter(), _samples(3)
    for dtype in (torch.float32, torch.bfloat16):
        root = tmp_path / str(dtype)
        counts = build_feature_cache(root, samples, adapter, GRID, storage_dtype=dtype, progress=False)
        assert counts == {"written": 3, "skipped": 0}
        cache = FeatureCache(root)
        for sample_id, video in samples:
            expected = adapter(video.unsqueeze(0), GRID)[0].to(dtype)
            loaded = cache.load(sample_id)
            assert loaded.dtype == dtype and loaded.shape == (3, 40, 32)
            assert torch.equal(loaded, expected)
        assert torch.equal(cache.load_batch([s for s, _ in samples[:2]]),
                           torch.stack([cache.load(s) for s, _ in samples[:2]]))
        assert sorted(p.name for p in root.iterdir()) == sorted([MANIFEST] + [entry_filename(s) for s, _ in samples])
        assert json.loads((root / MANIFEST).read_text())["spec"]["storage_dtype"] == str(dtype).removeprefix("torch.")


def _assert_no_partial_entry(root: Path, sample_id: str) -> None:
    cache = FeatureCache(root)
    assert not cache.path(sample_id).exists()
    assert not cache.has(sample_id)
    with pytest.raises(MissingFeatureError, match="no entry"):
        cache.load(sample_id)


_CRASHING_BUILD = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch
    sys.path.insert(0, {tests!r})
    from test_feature_cache import _adapter, _samples, GRID
    from crepa_kernels.training.feature_cache import build_feature_cache

    real_save, writes = safetensors.torch.save_file, []

    def save_then_die(tensors, path, metadata=None):  # the third entry: half its bytes on disk, then SIGKILL
        real_save(tensors, path, metadata=metadata)
        writes.append(path)
        if len(writes) == 3:
            os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = save_then_die
    build_feature_cache({root!r}, _samples(), _adapter(), GRID, storage_dtype=__import__("torch").float32,
                        progress=False)
""")


def test_a_process_killed_mid_write_leaves_no_entry_and_the_build_resumes(tmp_path):
    root = tmp_path / "cache"
    script = _CRASHING_BUILD.format(tests=str(REPO / "tests"), root=str(root))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    samples, adapter = _samples(), _adapter()
    leftovers = [p for p in root.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-written temporary file
    cache = FeatureCache(root)
    for sample_id, video in samples[:2]:
        assert torch.equal(cache.load(sample_id), adapter(video.unsqueeze(0), GRID)[0])
    for sample_id, _ in samples[2:]:
        _assert_no_partial_entry(root, sample_id)

    counts = build_feature_cache(root, samples, adapter, GRID, storage_dtype=torch.float32, progress=False)
    assert counts == {"written": 2, "skipped": 2}
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # the temporary file is gone
    for sample_id, video in samples:
        assert torch.equal(cache.load(sample_id), adapter(video.unsqueeze(0), GRID)[0])


def test_an_error_in_the_write_path_leaves_no_entry(tmp_path, monkeypatch):
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_half_then_fail(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        os.truncate(path, os.path.getsize(path) // 2)
        raise OSError(28, "No space left on device")

    samples, adapter, root = _samples(2), _adapter(), tmp_path / "cache"
    monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        build_feature_cache(root, samples, adapter, GRID, progress=False)
    assert [p.name for p in root.iterdir()] == [MANIFEST]  # neither an entry nor a temporary file
    _assert_no_partial_entry(root, samples[0][0])
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert build_feature_cache(root, samples, adapter, GRID, progress=False) == {"written": 2, "skipped": 0}


def test_an_interrupted_build_resumes_without_decoding_cached_samples(tmp_path):
    samples, adapter, root = _samples(5), _adapter(), tmp_path / "cache"

    def interrupted():
        for index, sample in enumerate(samples):
            if index == 3:
                raise KeyboardInterrupt
            yield sample

    with pytest.raises(KeyboardInterrupt):
        build_feature_cache(root, interrupted(), adapter, GRID, progress=False)
    decoded = []

    def lazy(sample_id, video):
        return lambda: decoded.append(sample_id) or video

    counts = build_feature_cache(root, [(s, lazy(s, v)) for s, v in samples], adapter, GRID, progress=False)
    assert counts == {"written": 2, "skipped": 3}
    assert decoded == [s for s, _ in samples[3:]]
    cache = FeatureCache(root)
    for sample_id, video in samples:
        assert torch.equal(cache.load(sample_id), adapter(video.unsqueeze(0), GRID)[0].bfloat16())


def test_fingerprint_mismatch_names_the_sample_and_what_changed(tmp_path):
    samples, adapter = _samples(2), _adapter()
    root = tmp_path / "cache"
    build_feature_cache(root, samples, adapter, GRID, progress=False)
    spec = json.loads((root / MANIFEST).read_text())["spec"]

    # a reader expecting other settings: another encoder's weights, another grid
    other = _adapter(seed=1)
    with pytest.raises(StaleFeatureError, match=r"encoder\.weights_sha256: cache has"):
        FeatureCache(root, expected={**spec, "encoder": other.describe(GRID)["encoder"]})
    with pytest.raises(StaleFeatureError, match=r"token_grid: cache has \[3, 5, 8\], expected \[3, 5, 9\]"):
        FeatureCache(root, expected={"token_grid": [3, 5, 9]})
    with pytest.raises(StaleFeatureError, match=r"frame_mapping\.temporal_mode: cache has \"mean\""):
        FeatureCache(root, expected={"frame_mapping": {"temporal_mode": "subsample"}})
    FeatureCache(root, expected={"token_grid": GRID, "frame_mapping": {"temporal_ratio": 4}})  # a subset; a tuple

    # building into the folder with other settings refuses, naming them, and writes nothing
    with pytest.raises(StaleFeatureError, match=r"preprocessing\.resolution: cache has 56, expected 28"):
        build_feature_cache(root, _samples(3), _adapter(resolution=28), GRID, progress=False)
    assert not FeatureCache(root).has(_samples(3)[2][0])

    # an entry computed with other settings (copied from another cache) is an error naming the sample
    foreign = tmp_path / "foreign"
    build_feature_cache(foreign, samples[:1], adapter, (3, 4, 8), progress=False)
    name = entry_filename(samples[0][0])
    (root / name).write_bytes((foreign / name).read_bytes())
    with pytest.raises(StaleFeatureError, match=r"sample 'clips/take 0:a'.*token_grid: entry has \[3, 4, 8\], expected \[3, 5, 8\]"):
        FeatureCache(root).load(samples[0][0])
    with pytest.raises(StaleFeatureError, match="sample 'clips/take 0:a'"):
        build_feature_cache(root, samples, adapter, GRID, progress=False)  # never recomputed silently
    with pytest.raises(MissingFeatureError, match="sample 'never built'"):
        FeatureCache(root).load("never built")
    with pytest.raises(MissingFeatureError, match="no cache.json"):
        FeatureCache(tmp_path / "nothing")


def test_dataloader_with_workers_reads_the_cache(tmp_path):
    samples, adapter, root = _samples(5), _adapter(), tmp_path / "cache"
    build_feature_cache(root, samples, adapter, GRID, progress=False)
    cache = FeatureCache(root, expected={"token_grid": list(GRID)})
    ids = [s for s, _ in samples]
    loader = torch.utils.data.DataLoader(CachedFeatures(cache, ids), batch_size=2, num_workers=2,
                                         multiprocessing_context="fork")
    seen = []
    for batch_ids, features in loader:
        assert features.shape[1:] == (3, 40, 32) and features.dtype == torch.bfloat16
        for sample_id, row in zip(batch_ids, features):
            assert torch.equal(row, cache.load(sample_id))
        seen += batch_ids
    assert seen == ids


def _write_clip(path: Path, frames: np.ndarray, codec: str) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate = 4_000_000
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


def _smooth_frames(count, height, width, seed):
    """Moving colour gradients, uint8 [F, H, W, 3]: smooth content a lossy codec keeps well."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rng = np.random.default_rng(seed)
    phase, speed = rng.uniform(0, 6, 3), rng.uniform(0.2, 0.6, 3)
    frames = [np.stack([0.5 + 0.4 * np.sin(4 * x + 3 * y + phase[c] + speed[c] * t) for c in range(3)], -1)
              for t in range(count)]
    return (np.stack(frames) * 255).round().astype(np.uint8)


def test_command_line_on_generated_video_files(tmp_path, capsys):
    pytest.importorskip("av")
    from crepa_kernels.training.video_files import list_videos, read_video

    clips = tmp_path / "clips"
    (clips / "day2").mkdir(parents=True)
    originals = {"a.mp4": _smooth_frames(11, 96, 160, 0), "day2/b.mkv": _smooth_frames(9, 96, 160, 1)}
    _write_clip(clips / "a.mp4", originals["a.mp4"], "mpeg4")
    _write_clip(clips / "day2" / "b.mkv", originals["day2/b.mkv"], "libx264")
    (clips / "notes.txt").write_text("not a video")
    assert [sample_id for sample_id, _ in list_videos(clips)] == ["a.mp4", "day2/b.mkv"]
    for name, frames in originals.items():  # the decoder gives back what was written, up to the codec's loss
        decoded = read_video(clips / name)
        assert decoded.shape == (3, len(frames), 96, 160)
        assert (decoded - torch.from_numpy(frames).permute(3, 0, 1, 2) / 255).abs().mean() < 0.03

    out = tmp_path / "cache"
    command = [sys.executable, "-m", "crepa_kernels.training.encode_videos", "--videos", str(clips), "--out",
               str(out), "--encoder", "random:dinov3_vit:2", "--frames", "9", "--size", "80x128", "--dtype", "fp32",
               "--chunk-size", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "2 written, 0 already cached, token grid (3, 5, 8)" in first.stdout
    # the progress bar: count, elapsed<remaining, and the rate (tqdm writes s/sample below one sample per second)
    assert re.search(r"2/2 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(sample/s|s/sample)", first.stderr), first.stderr

    adapter = adapter_for(random_encoder("dinov3_vit", seed=2), temporal_ratio=4)
    cache = FeatureCache(out, expected={"token_grid": [3, 5, 8], "input": {"frames": 9, "size": [80, 128]}})
    for sample_id in originals:
        video = read_video(clips / sample_id, num_frames=9, size=(80, 128))
        torch.testing.assert_close(cache.load(sample_id), adapter(video.unsqueeze(0), GRID)[0], rtol=1e-5, atol=1e-5)

    # the same command again (in this process, to save a start-up): everything is cached already
    assert encode_videos_main(command[3:] + ["--no-progress"]) == 0
    assert "0 written, 2 already cached" in capsys.readouterr().out
    with pytest.raises(StaleFeatureError, match='storage_dtype: cache has "float32", expected "bfloat16"'):
        encode_videos_main([*command[3:-4], "--dtype", "bf16", "--no-progress"])


@pytest.mark.parametrize("flag, value, message", [
    ("--resolution", "20x", "expected a shorter side in pixels, HxW or token_grid, got '20x'"),
    ("--resolution", "-3", "expected a shorter side in pixels"),
    ("--size", "80xab", "expected 2 positive ints separated by 'x', got '80xab'"),
    ("--patch-size", "1,2", "expected 3 positive ints separated by ',', got '1,2'"),
])
def test_command_line_rejects_bad_numbers_naming_the_flag(tmp_path, capsys, flag, value, message):
    arguments = {"--videos": str(tmp_path), "--out": str(tmp_path / "cache"), "--encoder": "random:dinov2",
                 "--frames": "9", "--size": "80x128", flag: value}
    with pytest.raises(SystemExit) as exit_info:
        encode_videos_main([text for pair in arguments.items() for text in pair])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_command_line_rejects_a_frame_count_the_vae_cannot_take(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        encode_videos_main(["--videos", str(tmp_path), "--out", str(tmp_path / "cache"), "--encoder", "random:dinov2",
                            "--frames", "10", "--size", "80x128"])
    assert exit_info.value.code == 2
    assert "--frames 10, --size 80x128, --patch-size 1,2,2: num_pixel_frames: a causal VAE with temporal ratio 4 " \
           "needs 1 + k * 4 frames, got 10" in capsys.readouterr().err


def test_trainer_from_the_cache_follows_the_encoder_run_step_for_step(tmp_path):
    """examples/train_dit.py with --encoder (a small random DINOv2) against --feature-cache built with it."""
    pytest.importorskip("diffusers")
    from test_training import trainer  # the example trainer, loaded once for both test files

    config = trainer.TrainConfig(steps=3, global_batch=2, pixel_frames=9, height=32, width=48, projector_width=32,
                                 encoder="random:dinov2")
    root = tmp_path / "cache"
    assert trainer.build_cache(config, str(root)) == {"written": 6, "skipped": 0}
    encoded = trainer.train(config, "reference")
    cached = trainer.train(dataclasses.replace(config, feature_cache=str(root)), "reference")
    report = trainer.compare(encoded, cached, trainer.TOLERANCES[torch.float32])
    assert all(entry["ok"] for entry in report.values()), report
    for run in (encoded, cached):
        assert all(record["peak_memory_mib"] > 0 for record in run.records)

    # a cache made for other data or more steps is never used silently
    with pytest.raises(StaleFeatureError, match="input.seed: cache has 0, expected 1"):
        trainer.train(dataclasses.replace(config, feature_cache=str(root), seed=1), "reference")
    with pytest.raises(MissingFeatureError, match="sample 'seed0-step3-video0'"):
        trainer.train(dataclasses.replace(config, feature_cache=str(root), steps=4), "reference")
