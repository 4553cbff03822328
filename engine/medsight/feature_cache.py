"""A bounded, thread-safe LRU cache of image encodings, keyed by content hash.

The ViT and the perceiver's encode pass are the most expensive per-slice work, and a user typically asks several
questions about the same slice: caching the `ImageEncoding` makes every follow-up question pay only for the language
model. The cache belongs to one Engine (never module-level), so two engines, or two models, never share features.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from medsight.model.medsight import ImageEncoding


def content_key(pixels: torch.Tensor, resize_mode: str, round_pixels_to_bf16: bool, model_identity: str) -> str:
    """sha256 of the prepared pixels plus everything else that changes the encoding of those pixels."""
    digest = hashlib.sha256()
    digest.update(f"{model_identity}|{resize_mode}|{round_pixels_to_bf16}|{tuple(pixels.shape)}|".encode())
    digest.update(pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """sha256 of the modules' parameters and buffers: equal for copies with equal weights (a trainer's throw-away
    copy, the same weights reloaded for the next stage), so they can share cached encodings; any change of a weight
    gives another fingerprint."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoding_bytes(encoding: ImageEncoding) -> int:
    """Memory held by one encoding's tensors."""
    tensors = (encoding.cls, encoding.patches, encoding.grid, encoding.region_tokens)
    return sum(t.numel() * t.element_size() for t in tensors)


def detached_copy(encoding: ImageEncoding) -> ImageEncoding:
    """Own copies of the tensors: a row selected from a batch would otherwise keep the whole batch alive."""
    return ImageEncoding(
        encoding.cls.clone(), encoding.patches.clone(), encoding.grid.clone(), encoding.region_tokens.clone()
    )


@dataclass
class CacheStats:
    """Counters for tests and the server's health page."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


class FeatureCache:
    """LRU map from content key to a single-image `ImageEncoding`, bounded by total tensor bytes.

    `max_bytes=0` disables caching. An entry larger than the whole bound is not stored.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("cache_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, tuple[ImageEncoding, int]] = OrderedDict()
        self._bytes = 0
        self._stats = CacheStats()
        # Requests run on several threads (the server's workers); every read or write of the map holds this lock.
        self._lock = threading.Lock()

    def get(self, key: str) -> ImageEncoding | None:
        """The cached encoding (now most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.hits += 1
            return entry[0]

    def put(self, key: str, encoding: ImageEncoding) -> None:
        """Store an encoding, evicting least recently used entries until the bound holds."""
        size = encoding_bytes(encoding)
        if size > self.max_bytes:
            return
        stored = detached_copy(encoding)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (stored, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self._stats.evictions += 1

    def clear(self) -> None:
        """Drop every entry (e.g. after the model's weights changed in place)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._stats.hits, self._stats.misses, self._stats.evictions, len(self._entries), self._bytes
            )


def encode_through_cache(
    cache: FeatureCache,
    encode: Callable[[torch.Tensor, bool], ImageEncoding],
    pixels: torch.Tensor,
    round_pixels_to_bf16: bool,
    model_identity: str,
) -> ImageEncoding:
    """``encode(pixels, round_pixels_to_bf16)`` for a (B, 3, H, W) batch of prepared pixels, taking each image from
    `cache` when it is there and encoding the misses in one batch (so a batch that misses entirely is encoded
    exactly as without a cache). Used by trainers whose vision side is frozen; the Engine keeps its own loop
    because it also reports which inputs were computed."""
    keys = [content_key(p, "prepared", round_pixels_to_bf16, model_identity) for p in pixels]
    found: dict[str, ImageEncoding] = {}
    missing: dict[str, int] = {}  # key -> first row with it: an image twice in a batch is encoded once
    for row, key in enumerate(keys):
        if key not in found and key not in missing:
            hit = cache.get(key)
            if hit is None:
                missing[key] = row
            else:
                found[key] = hit
    if missing:
        batch = encode(pixels[list(missing.values())], round_pixels_to_bf16)
        if len(missing) == len(keys):  # nothing cached: exactly the uncached result
            for i, key in enumerate(missing):
                cache.put(key, batch.select(i))
            return batch
        for i, key in enumerate(missing):
            found[key] = batch.select(i)
            cache.put(key, found[key])
    parts = [found[key] for key in keys]
    fields = ("cls", "patches", "grid", "region_tokens")
    return ImageEncoding(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))
