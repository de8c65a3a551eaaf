"""An offline cache of CREPA targets: encoder features on the DiT's token grid, computed once, read while training.

Keeping a VAE and DINOv2 on the GPU to decode latents and encode frames at every step does not fit next to a large
DiT; like the latent cache, the targets can be computed ahead of time. Layout of a cache folder:

* ``cache.json``: the settings the cache was built with (:meth:`EncoderAdapter.describe`: encoder class, config,
  weights digest, preprocessing, frame mapping, token grid; plus the storage dtype and, from the command line,
  the video frames and size) and their SHA-256, the fingerprint.
* one ``<sample id>-<hash>.safetensors`` per sample: the tensor ``features`` [F', H' * W', D] in bf16 or fp32,
  with the sample id, the fingerprint and the settings in its metadata.

Guarantees:

* **Atomic entries.** Each entry is written to a temporary file, flushed to disk, then renamed over its final name
  (``os.replace``): a crash leaves no entry, never a partial one, and the next build deletes the temporary file.
* **Resume.** A build skips the samples whose entry exists with the same fingerprint, so an interrupted build
  continues where it stopped; with lazy samples (a callable instead of a tensor) it does not even decode them.
* **No silent recomputation.** Reading a sample that has no entry raises :class:`MissingFeatureError`; an entry (or a
  cache) computed with other settings raises :class:`StaleFeatureError` naming the sample and every setting that
  changed. The reader never runs an encoder.
* **Reads** open the entry with ``safetensors.safe_open``, which memory-maps the file; a :class:`FeatureCache` holds
  only the folder and the settings, so :class:`CachedFeatures` works in a DataLoader with worker processes.

One builder per folder at a time. The command line over a folder of video files is
:mod:`crepa_kernels.training.encode_videos`::

    python -m crepa_kernels.training.encode_videos --videos clips/ --out cache/ --encoder facebook/dinov2-base \\
        --frames 49 --size 480x720 --temporal-ratio 4 --spatial-ratio 8 --patch-size 1,2,2
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import Dataset

MANIFEST = "cache.json"
FORMAT_VERSION = 1
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_TEMP_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import: os.umask can only be read by setting it


class MissingFeatureError(LookupError):
    """A sample has no entry in the cache."""


class StaleFeatureError(ValueError):
    """A cache or an entry was computed with other settings than the ones expected."""


def fingerprint(spec: dict) -> str:
    """SHA-256 of the settings as canonical JSON."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def cache_spec(adapter, token_grid: tuple[int, int, int], storage_dtype: torch.dtype = torch.bfloat16,
               extra: dict | None = None) -> dict:
    """The settings that key a cache: the adapter's description for ``token_grid``, the storage dtype and ``extra``
    (what else decides the input, e.g. the frames and size videos are decoded at)."""
    if storage_dtype not in STORAGE_DTYPES.values():
        raise ValueError(f"storage_dtype: expected torch.bfloat16 or torch.float32, got {storage_dtype}")
    spec = {**adapter.describe(token_grid), "storage_dtype": str(storage_dtype).removeprefix("torch."),
            "format": FORMAT_VERSION}
    if extra:
        spec["input"] = json.loads(json.dumps(extra, sort_keys=True))
    return spec


def differences(expected: dict, actual: dict, holder: str = "cache", prefix: str = "") -> list[str]:
    """The settings in ``expected`` (possibly a subset) that ``actual`` (the ``holder``'s) lacks or differs in."""
    changed = []
    for key, want in expected.items():
        path = f"{prefix}{key}"
        if key not in actual:
            changed.append(f"{path}: expected {_short(want)}, not recorded in the {holder}")
        elif isinstance(want, dict) and isinstance(actual[key], dict):
            changed.extend(differences(want, actual[key], holder, path + "."))
        elif want != actual[key]:
            changed.append(f"{path}: {holder} has {_short(actual[key])}, expected {_short(want)}")
    return changed


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def entry_filename(sample_id: str) -> str:
    """A file name for any sample id: its readable part plus a hash of the whole id (ids may contain '/')."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id).strip("._")[:80]
    return f"{readable}-{hashlib.sha256(sample_id.encode()).hexdigest()[:16]}.safetensors"


class FeatureCache:
    """Read access to a cache folder. ``expected``: settings the cache must have been built with, all of
    :func:`cache_spec` or a subset (e.g. ``{"token_grid": [13, 30, 45], "frame_mapping": {"temporal_ratio": 4}}``
    for a trainer that does not load the encoder); a difference raises :class:`StaleFeatureError`."""

    def __init__(self, root: str | Path, expected: dict | None = None) -> None:
        self.root = Path(root)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise MissingFeatureError(f"feature cache {str(self.root)!r}: no {MANIFEST}; build the cache first "
                                      f"(python -m crepa_kernels.training.encode_videos --help)")
        with open(manifest) as source:
            recorded = json.load(source)
        self.spec, self.fingerprint = recorded["spec"], recorded["fingerprint"]
        changed = differences(json.loads(json.dumps(expected or {})), self.spec)  # tuples compare as lists
        if changed:
            raise StaleFeatureError(f"feature cache {str(self.root)!r} was built with other settings: "
                                    + "; ".join(changed))

    def path(self, sample_id: str) -> Path:
        return self.root / entry_filename(sample_id)

    def _check_entry(self, sample_id: str, metadata: dict) -> None:
        if metadata.get("sample_id") != sample_id:
            raise StaleFeatureError(f"sample {sample_id!r}: its file {self.path(sample_id).name} in "
                                    f"{str(self.root)!r} holds sample {metadata.get('sample_id')!r}")
        if metadata.get("fingerprint") != self.fingerprint:
            changed = differences(self.spec, json.loads(metadata.get("spec", "{}")), holder="entry")
            raise StaleFeatureError(f"sample {sample_id!r} in feature cache {str(self.root)!r} was computed with "
                                    f"other settings than the cache's: " + ("; ".join(changed) or "fingerprint"))

    def has(self, sample_id: str) -> bool:
        """Whether the sample has a current entry (a stale one raises)."""
        from safetensors import safe_open

        if not self.path(sample_id).is_file():
            return False
        with safe_open(self.path(sample_id), framework="pt") as entry:
            self._check_entry(sample_id, entry.metadata())
        return True

    def load(self, sample_id: str) -> torch.Tensor:
        """The sample's targets [F', H' * W', D] in the storage dtype, read through a memory map."""
        from safetensors import safe_open

        path = self.path(sample_id)
        if not path.is_file():
            raise MissingFeatureError(f"sample {sample_id!r}: no entry in feature cache {str(self.root)!r} "
                                      f"(expected {path.name}); features are never computed on the fly: build them "
                                      f"with build_feature_cache or python -m crepa_kernels.training.encode_videos")
        with safe_open(path, framework="pt") as entry:
            self._check_entry(sample_id, entry.metadata())
            return entry.get_tensor("features")

    def load_batch(self, sample_ids: Iterable[str]) -> torch.Tensor:
        """[B, F', H' * W', D] for a batch of sample ids."""
        return torch.stack([self.load(sample_id) for sample_id in sample_ids])


class CachedFeatures(Dataset):
    """The cached targets of ``sample_ids`` as a map-style dataset: item i is (sample id, features)."""

    def __init__(self, cache: FeatureCache, sample_ids: list[str]) -> None:
        self.cache, self.sample_ids = cache, list(sample_ids)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        return self.sample_ids[index], self.cache.load(self.sample_ids[index])


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """``write(temporary_path)``, flush the file to disk, then rename it over ``path``: all or nothing."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}{_TEMP_SUFFIX}")
    try:
        write(str(temporary))
        os.chmod(temporary, 0o666 & ~_UMASK)  # as open() would create it; the writer may use 0600
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # makes the rename durable
    finally:
        os.close(descriptor)


def build_feature_cache(
    root: str | Path,
    samples: Iterable[tuple[str, torch.Tensor | Callable[[], torch.Tensor]]],
    adapter,
    token_grid: tuple[int, int, int],
    *,
    storage_dtype: torch.dtype = torch.bfloat16,
    extra: dict | None = None,
    total: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Compute and store the targets of every ``(sample_id, video)``; ``video`` is one sample in the adapter's
    layout without the batch dimension ([3, F, H, W] or [F, 3, H, W]), or a callable returning it (called only for
    samples not cached yet). Samples already cached with the same settings are skipped; a folder built with other
    settings raises :class:`StaleFeatureError`. Returns the counts of written and skipped samples."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    spec = cache_spec(adapter, token_grid, storage_dtype, extra)
    manifest = {"spec": spec, "fingerprint": fingerprint(spec)}
    if (root / MANIFEST).is_file():
        recorded = FeatureCache(root).spec
        if fingerprint(recorded) != manifest["fingerprint"]:
            changed = differences(spec, recorded) + [f"{key}: recorded in the cache, not in this build"
                                                     for key in recorded if key not in spec]
            raise StaleFeatureError(f"feature cache {str(root)!r} holds features computed with other settings: "
                                    + "; ".join(changed) + "; use another folder or delete this one")
    else:
        _write_atomically(root / MANIFEST, lambda path: Path(path).write_text(json.dumps(manifest, indent=1)))
    for leftover in root.glob(f".*{_TEMP_SUFFIX}"):  # from a build that crashed mid-write
        leftover.unlink(missing_ok=True)
    cache = FeatureCache(root)
    metadata = {"fingerprint": manifest["fingerprint"], "spec": json.dumps(spec, sort_keys=True)}
    if total is None and hasattr(samples, "__len__"):
        total = len(samples)

    counts, seen = {"written": 0, "skipped": 0}, set()
    bar = tqdm(samples, total=total, unit="sample", desc="encoding", disable=not progress, dynamic_ncols=True)
    for sample_id, video in bar:
        if not isinstance(sample_id, str) or sample_id in seen:
            raise ValueError(f"sample_id: expected unique strings, got {sample_id!r} "
                             f"{'twice' if sample_id in seen else f'of type {type(sample_id).__name__}'}")
        seen.add(sample_id)
        if cache.has(sample_id):
            counts["skipped"] += 1
        else:
            video = video() if callable(video) else video
            features = adapter(video.unsqueeze(0).to(adapter.device), token_grid)[0]
            tensors = {"features": features.to(storage_dtype).contiguous().cpu()}
            entry = {**metadata, "sample_id": sample_id, "video_shape": json.dumps(list(video.shape))}
            _write_atomically(cache.path(sample_id), lambda path: save_file(tensors, path, metadata=entry))
            counts["written"] += 1
        bar.set_postfix(counts, refresh=False)
    bar.close()
    return counts
