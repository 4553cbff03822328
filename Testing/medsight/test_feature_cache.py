"""`encode_through_cache`: the trainers' way to reuse the engine's `FeatureCache` without touching the model."""

from __future__ import annotations

import torch

import medsight
from medsight.feature_cache import FeatureCache, encode_through_cache
from medsight.model.loading import build_model

FIELDS = ("cls", "patches", "grid", "region_tokens")


def test_encode_through_cache_encodes_only_misses_and_returns_the_direct_encodings():
    model = build_model(medsight.get_preset("tiny"), seed=0)
    side = model.config.vision.image_size
    images = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(0))
    calls: list[int] = []

    def encode(pixels: torch.Tensor, round_pixels_to_bf16: bool):
        calls.append(pixels.shape[0])
        return model.encode(pixels, round_pixels_to_bf16)

    cache = FeatureCache(1 << 30)
    with torch.no_grad():
        direct = model.encode(images, False)
        first = encode_through_cache(cache, encode, images[:2], False, "m")  # both miss: one batch of 2
        mixed = encode_through_cache(cache, encode, images[[2, 0, 2]], False, "m")  # image 2 twice, 0 cached
        again = encode_through_cache(cache, encode, images[[1, 0]], False, "m")  # all hits: no call
    assert calls == [2, 1]
    assert cache.stats.entries == cache.stats.misses == 3 and cache.stats.hits == 3
    assert "encode" not in model.__dict__
    for got, rows in ((first, [0, 1]), (mixed, [2, 0, 2]), (again, [1, 0])):
        for name in FIELDS:
            torch.testing.assert_close(getattr(got, name), getattr(direct, name)[rows], rtol=1e-5, atol=1e-6)


def test_weights_fingerprint_follows_the_weights_not_the_object():
    import copy

    from medsight.feature_cache import weights_fingerprint

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).to(torch.bfloat16)
    twin = copy.deepcopy(module)
    assert weights_fingerprint(module) == weights_fingerprint(twin)
    with torch.no_grad():
        twin[0].weight[0, 0] += 1.0
    assert weights_fingerprint(module) != weights_fingerprint(twin)
    other = copy.deepcopy(module)
    other[1].running_mean.fill_(0.5)  # a buffer counts too
    assert weights_fingerprint(module) != weights_fingerprint(other)
