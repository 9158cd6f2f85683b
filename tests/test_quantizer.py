"""RandomProjectionVectorQuantizer: NeMo tokens/xq on nest_tiny, the matmul argmin == NeMo's materialised formula."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import PARITY
from nest_ssl.nest.quantizer import RandomProjectionVectorQuantizer, RandomProjectionVectorQuantizerConfig

SET = PARITY / "nest_tiny"


def _nemo_l2_tokens(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """NeMo 2.6.2's formula: materialise (B, T', H, d, C) in float64, norm over d, argmin over C."""
    diff = x.unsqueeze(-1) - codebooks.transpose(1, 2).unsqueeze(0).unsqueeze(0)
    return diff.norm(dim=-2).argmin(dim=-1)


def _tiny(**kw):
    base = dict(feat_in=8, code_dim=4, num_classes=32, num_books=2, dist_fn="l2", combine_time_steps=2)
    base.update(kw)
    return RandomProjectionVectorQuantizer(RandomProjectionVectorQuantizerConfig(**base))


@pytest.mark.numerics
def test_nest_tiny_tokens_and_xq_equal_nemo():
    cfg = json.loads((SET / "config.json").read_text())["model"]["quantizer"]
    q = RandomProjectionVectorQuantizer(RandomProjectionVectorQuantizerConfig(
        **{k: v for k, v in cfg.items() if k != "_target_"}))
    sd = np.load(SET / "state_dict.npz")
    q.load_state_dict({k[len("quantizer."):]: torch.from_numpy(sd[k]) for k in sd.files if k.startswith("quantizer.")})
    ref = np.load(SET / "quantizer.npz")
    xq, tokens = q(torch.from_numpy(np.load(SET / "preprocessor.npz")["features"]))
    assert tokens.dtype == torch.int64 and xq.dtype == torch.float64
    np.testing.assert_array_equal(tokens.numpy(), ref["tokens"])  # padding groups included
    np.testing.assert_array_equal(xq.numpy(), ref["xq"])  # NeMo's scrambled (B, d, T', H) layout


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matmul_argmin_equals_materialised_formula(seed):
    torch.manual_seed(seed)
    q = _tiny(num_classes=512, code_dim=16, feat_in=20, combine_time_steps=1, num_books=3)
    feats = torch.randn(4, 20, 50)
    feats[1, :, 30:] = 0  # zero groups: all distances tie at ||c||
    feats[3] = 0
    x = q.project(feats)
    ref = _nemo_l2_tokens(x, q.codebooks)
    assert torch.equal(q.tokens_from_projection(x), ref)


def test_cosine_is_argmax_of_cosine_similarity():
    torch.manual_seed(0)
    q = _tiny(dist_fn="cosine")
    feats = torch.randn(2, 8, 6)
    x = q.project(feats)
    sim = F.cosine_similarity(x.double().unsqueeze(-2), q.codebooks.unsqueeze(0).unsqueeze(0), dim=-1)
    _, tokens = q(feats)
    assert torch.equal(tokens, sim.argmax(-1))


@pytest.mark.numerics
def test_init_matches_nemo_recipe_and_freeze():
    torch.manual_seed(3)
    q = _tiny()
    torch.manual_seed(3)
    w = torch.empty(8, 16)
    torch.nn.Linear(16, 8, bias=False)  # default init consumes the RNG before xavier_normal_
    torch.nn.init.xavier_normal_(w)
    cb = torch.randn(2, 32, 4).double()
    torch.nn.init.normal_(cb)
    assert torch.equal(q.proj.weight, w)
    assert torch.equal(q.codebooks, F.normalize(cb, dim=-1))
    assert q.codebooks.dtype == torch.float64 and not any(p.requires_grad for p in q.parameters())
    assert _tiny(freeze=False).codebooks.requires_grad


def test_codebooks_stay_float64_under_casts():
    q = _tiny()
    ref = q.codebooks.detach().clone()
    q = q.to(torch.bfloat16)
    assert q.codebooks.dtype == torch.float64 and q.proj.weight.dtype == torch.bfloat16
    assert torch.equal(q.codebooks, ref)  # not rounded through bf16
    _, tokens = q(torch.randn(1, 8, 4))
    assert tokens.shape == (1, 2, 2)


def test_tokens_unchanged_under_bf16_autocast():
    torch.manual_seed(0)
    q, feats = _tiny(), torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, t_auto = q(feats)
    assert torch.equal(t_auto, q(feats)[1])


def test_squeeze_single_and_time_ahead():
    q = _tiny(num_books=1, squeeze_single=True, time_ahead=True)
    xq, tokens = q(torch.randn(2, 6, 8))  # (B, T, F)
    assert xq.shape == (2, 3, 4) and tokens.shape == (2, 3)


@pytest.mark.parametrize("kw,match", [(dict(dist_fn="dot"), "dist_fn"), (dict(combine_time_steps=0), "combine")])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**kw)


def test_frames_not_divisible_raises_with_values():
    with pytest.raises(ValueError, match="T=7.*combine_time_steps=2"):
        _tiny()(torch.randn(1, 8, 7))


@pytest.mark.gpu
def test_cuda_tokens_equal_cpu():
    torch.manual_seed(0)
    q, feats = _tiny(num_classes=256, code_dim=16), torch.randn(3, 8, 64)
    _, ref = q(feats)
    _, got = q.cuda()(feats.cuda())
    assert q.codebooks.dtype == torch.float64 and torch.equal(got.cpu(), ref)
