"""MultiSoftmaxDecoder and MultiMLMLoss against nest_tiny; the finite no-token loss; bad input."""
import numpy as np
import pytest
import torch

from conftest import PARITY
from nest_ssl.nest.decoder import MultiSoftmaxDecoder, MultiSoftmaxDecoderConfig
from nest_ssl.nest.losses import MultiMLMLoss, MultiMLMLossConfig

SET = PARITY / "nest_tiny"


def _loss(H=2, **kw):
    return MultiMLMLoss(MultiMLMLossConfig(combine_time_steps=8, mask_threshold=0.8, num_decoders=H, **kw))


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


@pytest.mark.numerics
def test_decoder_log_probs_match_nemo():
    sd = np.load(SET / "state_dict.npz")
    f = np.load(SET / "forward.npz")
    dec = MultiSoftmaxDecoder(MultiSoftmaxDecoderConfig(feat_in=64, num_classes=64, num_decoders=2, use_bias=True))
    dec.load_state_dict({k[len("decoder."):]: torch.from_numpy(sd[k]) for k in sd.files if k.startswith("decoder.")})
    got = dec(torch.from_numpy(f["encoded"])).detach().numpy()
    assert got.shape == f["log_probs"].shape
    for b, n in enumerate(f["encoded_lengths"]):
        assert _rel(got[b, :n], f["log_probs"][b, :n]) <= 1e-4


def test_decoder_init_and_channel_layout():
    torch.manual_seed(0)
    dec = MultiSoftmaxDecoder(MultiSoftmaxDecoderConfig(feat_in=16, num_classes=5, num_decoders=3, use_bias=True))
    w = dec.decoder_layers[0].weight
    assert w.abs().max() <= (6 / (16 + 15)) ** 0.5
    x = torch.randn(2, 16, 7)
    logits = dec.decoder_layers(x).transpose(1, 2)  # (B, T, C*H)
    lp = dec(x)
    assert lp.shape == (2, 7, 5, 3)
    torch.testing.assert_close(lp[..., 1], torch.log_softmax(logits[..., 1::3], dim=-1))  # channel c*H + h


def test_squeeze_single_decoder():
    dec = MultiSoftmaxDecoder(MultiSoftmaxDecoderConfig(feat_in=4, num_classes=6, num_decoders=1, squeeze_single=True))
    assert dec(torch.randn(1, 4, 3)).shape == (1, 3, 6)


@pytest.mark.parametrize("masks_key,lp_key,tok_key,loss_key", [
    ("masking.npz:masks", "forward.npz:log_probs", "forward.npz:tokens", "decoder_loss.npz:loss"),
    ("decoder_loss.npz:syn_masks", "decoder_loss.npz:syn_log_probs", "decoder_loss.npz:syn_targets",
     "decoder_loss.npz:syn_loss")])
@pytest.mark.numerics
def test_mlm_loss_matches_nemo(masks_key, lp_key, tok_key, loss_key):
    def load(key):
        name, arr = key.split(":")
        return np.load(SET / name)[arr]
    loss = _loss()(torch.from_numpy(load(masks_key)), torch.from_numpy(load(lp_key)),
                   torch.from_numpy(load(tok_key)))
    assert abs(float(loss) - float(load(loss_key))) <= 1e-6 * abs(float(load(loss_key)))


def test_threshold_counts_seven_of_eight_not_six():
    loss = _loss(H=1)
    masks = torch.zeros(1, 2, 16)
    masks[:, :, :7] = 1  # token 0: 7/8 frames
    masks[:, :, 8:14] = 1  # token 1: 6/8 frames
    lp = torch.log_softmax(torch.randn(1, 2, 4, 1), dim=2)
    tgt = torch.tensor([[[1], [2]]])
    out = loss(masks, lp, tgt)
    assert loss.last_num_selected == 1
    torch.testing.assert_close(out, -lp[0, 0, 1, 0])


def test_no_selected_token_gives_finite_zero_that_backpropagates():
    loss = _loss()
    lp = torch.log_softmax(torch.randn(2, 3, 4, 2, requires_grad=True), dim=2)
    out = loss(torch.zeros(2, 5, 24), lp, torch.zeros(2, 3, 2, dtype=torch.long))
    assert out.item() == 0.0 and loss.last_num_selected == 0
    out.backward()  # a graph exists; gradients are zero


@pytest.mark.parametrize("masks,lp,tgt,match", [
    (torch.zeros(2, 5, 23), torch.zeros(2, 3, 4, 2), torch.zeros(2, 3, 2), "combine_time_steps=8"),
    (torch.zeros(2, 5, 24), torch.zeros(2, 4, 4, 2), torch.zeros(2, 4, 2), "does not match"),
    (torch.zeros(2, 5, 24), torch.zeros(2, 3, 4, 2), torch.zeros(2, 3, 1), "num_decoders=2"),
    (torch.zeros(2, 5, 24), torch.zeros(2, 3, 4, 1), torch.zeros(2, 3, 1), "H=2"),
    (torch.zeros(5, 24), torch.zeros(2, 3, 4, 2), torch.zeros(2, 3, 2), "masks must be"),
])
def test_bad_input_raises(masks, lp, tgt, match):
    with pytest.raises(ValueError, match=match):
        _loss()(masks, lp, tgt.long())
