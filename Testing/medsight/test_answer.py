import numpy as np
import pytest
import torch

from medsight.answer import regions_from_logits


def test_regions_from_logits_summarise_each_mask_like_a_per_mask_loop():
    gen = torch.Generator().manual_seed(3)
    source = torch.randn(3, 20, 30, generator=gen) - 1.0
    source[1] = -5.0  # an empty mask
    source[2, 4:9, 11:17] = 3.0
    source[2][source[2] < 3.0] = -1.0  # a single box
    logits = torch.randn(3, 8, 8, generator=gen)
    names = [("[M0_1]", "liver"), ("[M0_2]", ""), (None, "")]
    regions = regions_from_logits(names, logits, source)

    assert [(r.code, r.label, r.index) for r in regions] == [("[M0_1]", "liver", 0), ("[M0_2]", "", 1), (None, "", 2)]
    for k, region in enumerate(regions):
        mask = source[k].numpy() > 0
        np.testing.assert_array_equal(region.mask, mask)
        assert torch.equal(region.mask_logits, logits[k])
        if mask.any():
            rows, cols = np.nonzero(mask)
            assert region.bbox == (rows.min(), cols.min(), rows.max(), cols.max())
            expected = 1 / (1 + np.exp(-source[k].double().numpy()[mask]))
            assert abs(region.probability - expected.mean()) <= 1e-6
        else:
            assert region.bbox is None and region.probability == 0.0
    assert regions[2].bbox == (4, 11, 8, 16)


def test_regions_from_logits_refuses_mismatched_names():
    with pytest.raises(ValueError, match="2 names for 3 mask channels"):
        regions_from_logits([(None, "")] * 2, torch.zeros(3, 4, 4), torch.zeros(3, 5, 5))
