"""RandomBlockMasking: NeMo 2.6.2's distribution (not its RNG stream), disjointness, padding, the short rule."""
import numpy as np
import pytest
import torch

from conftest import PARITY
from nest_ssl.nest.masking import RandomBlockMasking, RandomBlockMaskingConfig


def _masker(**kw):
    base = dict(feat_in=4, mask_prob=0.01, block_size=40, allow_overlap=True)
    base.update(kw)
    return RandomBlockMasking(RandomBlockMaskingConfig(**base))


def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of True."""
    x = np.concatenate([[0], row.numpy().astype(int), [0]])
    d = np.diff(x)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def test_masked_fraction_matches_binomial_blocks():
    m, g = _masker(), torch.Generator().manual_seed(0)
    lengths = torch.full((64,), 3000)
    masks = m.sample_masks(lengths, 3000, g)
    # starts ~ Bernoulli(p) on [0, l - block): P(t masked) = 1 - (1 - p)^block away from the edges
    expected = 1 - (1 - 0.01) ** 40
    frac = masks[:, 100:2900].float().mean().item()
    assert abs(frac - expected) < 0.02, (frac, expected)


def test_start_count_is_binomial_mean():
    m, g = _masker(block_size=1, mask_prob=0.1), torch.Generator().manual_seed(1)
    masks = m.sample_masks(torch.full((200,), 500), 500, g)  # block 1: #masked frames == #starts
    counts = masks.sum(1).float()
    n = 500 - 1
    assert abs(counts.mean().item() - n * 0.1) < 3 * (n * 0.1 * 0.9 / 200) ** 0.5 * 2


def test_padding_never_masked_and_mask_constant_over_features():
    m, g = _masker(mask_prob=0.2), torch.Generator().manual_seed(2)
    feats = torch.randn(3, 4, 400)
    lengths = torch.tensor([400, 250, 120])
    masked, masks = m(feats, lengths, generator=g)
    for b, n in enumerate(lengths.tolist()):
        assert masks[b, :, n:].sum() == 0
        assert torch.equal(masked[b, :, n:], feats[b, :, n:])
    assert torch.equal(masks, masks[:, :1].expand_as(masks))
    sel = masks[:, 0] == 1
    emb = m.mask_embedding.view(1, -1, 1).expand_as(feats)
    assert torch.equal(masked.transpose(1, 2)[sel], emb.transpose(1, 2)[sel])
    assert torch.equal(masked.transpose(1, 2)[~sel], feats.transpose(1, 2)[~sel])


def test_short_utterance_rule():
    m = _masker()
    lengths = torch.tensor([50, 5, 51, 0])  # block 40 >= 0.8 * l for l <= 50
    masks = m.sample_masks(lengths, 60, torch.Generator().manual_seed(0))
    assert _runs(masks[0]) == [(0, 8)] and _runs(masks[1]) == [(0, 5)] and masks[3].sum() == 0
    assert masks[2, 51:].sum() == 0


@pytest.mark.parametrize("seed", range(4))
def test_no_overlap_blocks_are_disjoint_and_sized(seed):
    m, g = _masker(allow_overlap=False, mask_prob=0.3, block_size=10), torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1000, 700, 333])
    masks = m.sample_masks(lengths, 1000, g)
    for b, n in enumerate(lengths.tolist()):
        num = int(np.ceil(n * 0.3 / 10))
        runs = _runs(masks[b])
        assert masks[b, n:].sum() == 0
        # blocks of 10 on a grid of 10 (+ one offset): disjoint, but adjacent ones merge into longer runs
        assert sum(e - s for s, e in runs) <= num * 10 and all((e - s) % 10 == 0 or e == n for s, e in runs)
        offsets = {s % 10 for s, _ in runs}
        assert len(offsets) == 1


def test_no_overlap_shrinks_block_when_blocks_do_not_fit():
    m = _masker(allow_overlap=False, mask_prob=0.9, block_size=10)
    masks = m.sample_masks(torch.tensor([60]), 60, torch.Generator().manual_seed(0))
    # num = ceil(60 * 0.9 / 10) = 6 -> bs = 60 // 7 = 8; slots = 60 // 8 - 1 = 6, all chosen
    assert masks.sum() <= 6 * 8


def test_reproducible_from_generator():
    m = _masker(mask_prob=0.05)
    a = m.sample_masks(torch.tensor([900, 500]), 900, torch.Generator().manual_seed(7))
    b = m.sample_masks(torch.tensor([900, 500]), 900, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_apply_masks_equals_nemo_masked_features():
    sd = np.load(PARITY / "nest_tiny" / "state_dict.npz")
    feats = np.load(PARITY / "nest_tiny" / "preprocessor.npz")["features"]
    masks = np.load(PARITY / "nest_tiny" / "masking.npz")["masks"]
    m = _masker(feat_in=80)
    m.load_state_dict({"mask_embedding": torch.from_numpy(sd["mask_processor.mask_embedding"])})
    got = m.apply_masks(torch.from_numpy(feats), torch.from_numpy(masks))
    ref = np.where(masks == 1, sd["mask_processor.mask_embedding"].reshape(1, -1, 1), feats)
    np.testing.assert_array_equal(got.numpy(), ref)


def test_freeze_and_mask_value():
    assert not _masker().mask_embedding.requires_grad
    assert _masker(freeze=False).mask_embedding.requires_grad
    m = _masker(mask_value=0.5, freeze=False)
    assert torch.all(m.mask_embedding == 0.5) and not m.mask_embedding.requires_grad


def test_bad_masks_shape_raises():
    with pytest.raises(ValueError, match="masks shape"):
        _masker().apply_masks(torch.zeros(2, 4, 10), torch.zeros(2, 4, 9))


@pytest.mark.gpu
def test_cuda_generator_masks_respect_lengths():
    m = _masker(mask_prob=0.05).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    feats, lengths = torch.randn(4, 4, 900, device="cuda"), torch.tensor([900, 700, 40, 300], device="cuda")
    _, masks = m(feats, lengths, generator=g)
    t = torch.arange(900, device="cuda")
    assert masks.sum() > 0 and not torch.any(masks[:, 0].bool() & (t >= lengths[:, None]))
