"""The perceiver's exact shortcuts: region tokens without the last image path, and the query-independent start
(`GridFeatures`) computed once per grid and shared by encode and decode. Every output must be bit for bit the same."""

import pytest
import torch

import medsight
from medsight.config import get_preset
from medsight.model.perceiver import ATTENTION_IMPLEMENTATIONS, RegionPerceiver


@pytest.fixture(scope="module", params=["tiny", "demo"])
def perceiver(request) -> RegionPerceiver:
    torch.manual_seed(3)
    return RegionPerceiver(get_preset(request.param).perceiver).eval()


def random_grid(perceiver: RegionPerceiver, batch: int, side: int) -> torch.Tensor:
    return torch.randn(batch, side, side, perceiver.cfg.dim, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("kernel", ATTENTION_IMPLEMENTATIONS)
@torch.inference_mode()
def test_region_tokens_equal_the_full_forward_bit_for_bit(perceiver, kernel):
    perceiver.attention_implementation = kernel
    for batch, side in ((1, 4), (3, 6)):
        grid = random_grid(perceiver, batch, side)
        full = perceiver(grid).queries
        assert torch.equal(perceiver.region_tokens(grid), full)
        assert torch.equal(perceiver.region_tokens(grid, perceiver.grid_features(grid)), full)


@pytest.mark.parametrize("kernel", ATTENTION_IMPLEMENTATIONS)
@torch.inference_mode()
def test_shared_grid_features_give_the_same_decode_bit_for_bit(perceiver, kernel):
    perceiver.attention_implementation = kernel
    grid = random_grid(perceiver, 2, 5)
    codes = torch.randn(2, 3, perceiver.cfg.dim, generator=torch.Generator().manual_seed(7))
    shared = perceiver.grid_features(grid)
    # The stage-0 image features are the same tensor values whatever the queries.
    assert torch.equal(perceiver(grid).multi_scale_features[0], shared.features)
    masks, classes = perceiver.decode(grid, codes)
    shared_masks, shared_classes = perceiver.decode(grid, codes, grid_features=shared)
    assert torch.equal(shared_masks, masks) and torch.equal(shared_classes, classes)
    # Rows of features computed in a larger batch (the engine's encode batch vs a decode group): the same within
    # float rounding only, as for any batched op (oneDNN picks kernels by batch size).
    alone, _ = perceiver.decode(grid[1:], codes[1:])
    selected, _ = perceiver.decode(grid[1:], codes[1:], grid_features=shared[1:])
    assert float((selected - alone).abs().max()) <= 1e-4


def test_grid_features_of_another_grid_are_refused(perceiver):
    grid = random_grid(perceiver, 2, 4)
    with pytest.raises(ValueError, match="grid_features are for shape"):
        perceiver(grid, grid_features=perceiver.grid_features(grid[:1]))


@torch.inference_mode()
def test_model_encode_and_decode_regions_are_unchanged_by_the_shortcuts():
    """`encode` (region tokens only, grid features kept) and `decode_regions` with the kept features give the
    full forward's tokens and the plain decode's masks exactly."""
    model = medsight.load_model("tiny", device="cpu")
    side = model.config.vision.image_size
    pixels = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(0))
    encoding = model.encode(pixels, keep_grid_features=True)
    assert model.encode(pixels).grid_features is None
    assert torch.equal(encoding.region_tokens, model.region_perceiver(encoding.grid).queries)
    hidden = model.config.llm.hidden_size
    gen = torch.Generator().manual_seed(1)
    states = [torch.randn(k, hidden, generator=gen) for k in (2, 0, 2)]
    plain = model.decode_regions(encoding.grid, states)
    shared = model.decode_regions(encoding.grid, states, grid_features=encoding.grid_features)
    for a, b in zip(plain, shared, strict=True):
        assert torch.equal(a, b)
    one = model.encode(pixels[2:], keep_grid_features=True).select(0)  # a one-slice ask
    assert torch.equal(model.decode_regions(one.grid, states[2:], grid_features=one.grid_features)[0],
                       model.decode_regions(one.grid, states[2:])[0])
