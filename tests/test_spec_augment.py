"""SpectrogramAugmentation: NeMo's mask semantics (counts, widths, bounds, draw order), RNG control, bad config."""
import random

import pytest
import torch

from nest_ssl.spec_augment import SpectrogramAugmentation, SpectrogramAugmentationConfig

MASK = -100.0  # a value the random input never takes, so masked cells are recognisable


def make(**kw) -> SpectrogramAugmentation:
    return SpectrogramAugmentation(SpectrogramAugmentationConfig(**{"mask_value": MASK, **kw}))


def spec(B=4, F=80, T=200, seed=0):
    return torch.randn(B, F, T, generator=torch.Generator().manual_seed(seed)), torch.tensor([200, 150, 61, 7][:B])


def test_nest_config_is_identity_without_parameters():
    aug = SpectrogramAugmentation(SpectrogramAugmentationConfig(freq_masks=0, time_masks=0, freq_width=27,
                                                                time_width=0.05))
    x, n = spec()
    assert aug(x, n) is x
    assert list(aug.parameters()) == [] and aug.state_dict() == {}


@pytest.mark.parametrize("time_width", [10, 0.05])
def test_time_masks_are_whole_columns_inside_length(time_width):
    x, n = spec()
    keep = x.clone()
    y = make(time_masks=3, time_width=time_width)(x, n, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, keep)
    cols = (y == MASK).all(dim=1)  # (B, T) a masked column is masked on every feature
    assert torch.equal((y == MASK).any(dim=1), cols)
    for b, L in enumerate(n.tolist()):
        max_w = time_width if isinstance(time_width, int) else int(time_width * L)
        assert int(cols[b].sum()) <= 3 * max_w
        assert not cols[b, L:].any()


def test_freq_masks_are_whole_rows_with_bounded_width():
    x, n = spec()
    y = make(freq_masks=2, freq_width=27)(x, n, generator=torch.Generator().manual_seed(2))
    rows = (y == MASK).all(dim=2)  # (B, F)
    assert torch.equal((y == MASK).any(dim=2), rows)
    assert rows.any() and all(int(r.sum()) <= 2 * 26 for r in rows)


def test_vectorized_draw_order_follows_nemo():
    """Widths then starts from torch.rand, time masks before freq masks, floor((U * (len - w)))."""
    x, n = spec(B=3)
    aug = make(time_masks=2, time_width=0.1, freq_masks=1, freq_width=10)
    y = aug(x, n, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    tw = (torch.rand((3, 2), generator=g) * torch.clamp(0.1 * n, max=200)[:, None]).long()
    ts = (torch.rand((3, 2), generator=g) * (n[:, None] - tw)).long()
    fw = (torch.rand((3, 1), generator=g) * 10).long()
    fs = (torch.rand((3, 1), generator=g) * (80 - fw)).long()
    want = torch.zeros(3, 80, 200, dtype=torch.bool)
    for b in range(3):
        for m in range(2):
            want[b, :, ts[b, m]:ts[b, m] + tw[b, m]] = True
        want[b, fs[b, 0]:fs[b, 0] + fw[b, 0], :] = True
    assert torch.equal(y == MASK, want)


def test_generator_makes_masks_reproducible():
    x, n = spec()
    aug = make(time_masks=2, freq_masks=2, freq_width=20, time_width=20)
    a = aug(x, n, generator=torch.Generator().manual_seed(3))
    b = aug(x, n, generator=torch.Generator().manual_seed(3))
    c = aug(x, n, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_legacy_path_uses_python_rng_within_bounds():
    x, n = spec()
    aug = make(time_masks=2, freq_masks=1, freq_width=5, time_width=0.2, use_vectorized_spec_augment=False)
    a = aug(x, n, rng=random.Random(7))
    assert torch.equal(a, aug(x, n, rng=random.Random(7)))
    cols = (a == MASK).all(dim=1)
    for b, L in enumerate(n.tolist()):
        w = max(1, int(0.2 * L))
        assert int(cols[b].sum()) <= 2 * w
        assert not cols[b, max(1, L - w) + w:].any()


def test_rect_masks_cut_rectangles():
    x, n = spec(B=2)
    keep = x.clone()
    y = SpectrogramAugmentation(SpectrogramAugmentationConfig(rect_masks=3, rect_time=10, rect_freq=8))(
        x, n, rng=random.Random(0))
    assert torch.equal(x, keep)
    zero = y == 0
    assert zero.any() and int(zero.sum()) <= 2 * 3 * 8 * 10


@pytest.mark.parametrize("kw,match", [
    (dict(time_width=1.5), "time_width=1.5"),
    (dict(time_width=-2), "time_width=-2"),
    (dict(freq_masks=-1), "freq_masks=-1"),
    (dict(mask_value="mean"), "mask_value='mean'"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_freq_width_larger_than_features_raises():
    x, n = spec(F=20)
    with pytest.raises(ValueError, match="freq_width=27"):
        make(freq_masks=1, freq_width=27)(x, n)
