"""Model-input mapping: the official crop is exact, and both modes invert exactly for masks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsight.config import CLIP_MEAN, CLIP_STD
from medsight.model.preprocess import UNSEEN_LOGIT, prepare_image


def test_official_crop_is_bit_exact(perceiver_io):
    side = perceiver_io["cropped_uint8"].shape[0]
    pixels, transform = prepare_image(perceiver_io["raw_image_uint8"].numpy(), side, CLIP_MEAN, CLIP_STD, "crop")
    assert torch.equal(pixels, perceiver_io["pixel_values"])
    # The official centre crop of the resized image: offsets round((H - S) / 2) and round((W - S) / 2).
    height, width = perceiver_io["resized_uint8"].shape[:2]
    top, left = round((height - side) / 2), round((width - side) / 2)
    cropped = perceiver_io["resized_uint8"][top : top + side, left : left + side]
    assert torch.equal(cropped, perceiver_io["cropped_uint8"])
    assert (transform.shift_y, transform.shift_x) == (-top, -left)


def rectangle_logits(size: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    logits = torch.full((1, size, size), -10.0, dtype=torch.float64)
    logits[0, y0:y1, x0:x1] = 10.0
    return logits


@pytest.mark.parametrize("mode", ["crop", "letterbox"])
@pytest.mark.parametrize("shape", [(60, 76), (76, 60), (64, 64), (300, 47)])
def test_mask_on_model_input_maps_back_within_one_pixel(mode, shape):
    image = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    _, t = prepare_image(image, 56, CLIP_MEAN, CLIP_STD, mode)
    m = 192  # mask logits cover the 56-pixel model input at 192 x 192
    y0, y1, x0, x1 = 60, 130, 70, 150
    mask = (t.logits_to_source(rectangle_logits(m, y0, y1, x0, x1))[0] > 0).numpy()
    # Where the rectangle's edges land on the source grid.
    (sy0, sx0), (sy1, sx1) = t.to_source(np.array([[y0, x0], [y1, x1]]) * 56 / m)
    sy0, sy1 = max(sy0, 0), min(sy1, shape[0])
    sx0, sx1 = max(sx0, 0), min(sx1, shape[1])
    rows, cols = np.nonzero(mask)
    assert abs(rows.min() - sy0) <= 1 and abs(rows.max() + 1 - sy1) <= 1
    assert abs(cols.min() - sx0) <= 1 and abs(cols.max() + 1 - sx1) <= 1
    assert mask.shape == shape


@pytest.mark.parametrize("mode", ["crop", "letterbox"])
def test_points_round_trip(mode):
    _, t = prepare_image(np.zeros((90, 33), dtype=np.uint8), 56, CLIP_MEAN, CLIP_STD, mode)
    points = np.random.default_rng(0).uniform(0, 33, (50, 2))
    assert np.abs(t.to_source(t.to_model(points)) - points).max() < 1e-12


def test_letterbox_keeps_every_pixel_and_crop_drops_borders():
    image = np.full((40, 100, 3), 200, dtype=np.uint8)
    everywhere = torch.full((1, 32, 32), 5.0)
    _, letterbox = prepare_image(image, 56, CLIP_MEAN, CLIP_STD, "letterbox")
    assert (letterbox.logits_to_source(everywhere) > 0).all()
    _, crop = prepare_image(image, 56, CLIP_MEAN, CLIP_STD, "crop")
    seen = crop.logits_to_source(everywhere)[0]
    assert (seen[:, :25] == UNSEEN_LOGIT).all() and (seen[:, 45:55] > 0).all()


def test_square_images_match_the_official_resize():
    image = np.random.default_rng(3).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    crop_pixels, t = prepare_image(image, 56, CLIP_MEAN, CLIP_STD, "crop")
    box_pixels, _ = prepare_image(image, 56, CLIP_MEAN, CLIP_STD, "letterbox")
    assert torch.equal(crop_pixels, box_pixels)
    logits = torch.randn(2, 32, 32, dtype=torch.float64)
    official = F.interpolate(logits[None], size=(100, 100), mode="bilinear", align_corners=False)[0]
    assert float((t.logits_to_source(logits) - official).abs().max()) < 1e-12


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="expected an 8-bit image, got dtype float32"):
        prepare_image(np.zeros((4, 4), dtype=np.float32), 56, CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="expected an image of shape"):
        prepare_image(np.zeros((4, 4, 2), dtype=np.uint8), 56, CLIP_MEAN, CLIP_STD)
    # An empty grey image is named by the shape it was given, not the (H, W, 3) it would have become.
    empty = np.zeros((0, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match=rf"got \({empty.shape[0]}, {empty.shape[1]}\)$"):
        prepare_image(empty, 56, CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="unknown resize mode 'stretch'"):
        prepare_image(np.zeros((4, 4), dtype=np.uint8), 56, CLIP_MEAN, CLIP_STD, "stretch")
