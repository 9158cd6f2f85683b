"""FastConformer encoder: NeMo's parameter counts and keys, padding/batch invariance, options and errors."""
import math

import pytest
import torch
import yaml

from conftest import SPEC
from nest_ssl.conformer.encoder import ConformerEncoder, ConformerEncoderConfig, compute_stochastic_depth_drop_probs

NEST = yaml.safe_load((SPEC / "nest_fast-conformer.nemo.yaml").read_text())["model"]["encoder"]
NEST = {**{k: v for k, v in NEST.items() if k != "_target_"}, "feat_in": 80}
TINY = dict(feat_in=80, n_layers=2, d_model=32, n_heads=2, subsampling="dw_striding", subsampling_factor=8,
            subsampling_conv_channels=8, conv_kernel_size=9, dropout=0.0, dropout_pre_encoder=0.0, dropout_att=0.0,
            dropout_emb=0.0)


def meta_encoder(**over):
    with torch.device("meta"):
        return ConformerEncoder(ConformerEncoderConfig(**{**NEST, **over}))


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_nest_l_parameter_counts_equal_nemo():
    enc = meta_encoder()
    assert n_params(enc) == 108_762_112
    assert n_params(enc.pre_encode) == 1_450_496
    assert all(n_params(layer) == 6_312_448 for layer in enc.layers)


def test_nest_xl_parameter_count_equals_nemo():
    assert n_params(meta_encoder(d_model=1024, n_layers=24, use_bias=False, xscaling=False)) == 607_306_752


def test_nest_l_state_dict_keys_and_shapes_equal_nemo_key_list():
    ref = []
    for line in (SPEC / "nest_large_state_dict.txt").read_text().splitlines():
        if line.startswith("encoder."):
            ref.append(line.split()[0])
    sd = meta_encoder().state_dict()
    assert ["encoder." + k for k in sd] == ref
    assert tuple(sd["layers.3.self_attn.pos_bias_u"].shape) == (8, 64)
    assert tuple(sd["layers.0.conv.depthwise_conv.weight"].shape) == (512, 1, 9)


def tiny(**over):
    torch.manual_seed(0)
    return ConformerEncoder(ConformerEncoderConfig(**{**TINY, **over})).eval()


@pytest.mark.parametrize("subsampling,factor", [("dw_striding", 8), ("striding", 4), ("dw_striding", 2)])
def test_appending_zeros_keeps_valid_outputs(subsampling, factor):
    enc = tiny(subsampling=subsampling, subsampling_factor=factor)
    x = torch.randn(2, 80, 64)
    lengths = torch.tensor([64, 37])
    x[1, :, 37:] = 0
    longer = torch.cat([x, torch.zeros(2, 80, 32)], dim=2)
    with torch.no_grad():
        a, la = enc(x, lengths)
        b, lb = enc(longer, lengths)
    assert torch.equal(la, lb)
    for i, n in enumerate(la.tolist()):
        torch.testing.assert_close(a[i, :, :n], b[i, :, :n], rtol=1e-5, atol=1e-5)


def test_batch_of_one_equals_the_same_utterance_in_a_padded_batch():
    enc = tiny()
    x = torch.randn(2, 80, 80)
    with torch.no_grad():
        single, l1 = enc(x[1:, :, :53], torch.tensor([53]))
        batch, l2 = enc(x, torch.tensor([80, 53]))
    assert l1.item() == l2[1].item() == math.ceil(53 / 8)
    torch.testing.assert_close(single[0, :, : l1.item()], batch[1, :, : l1.item()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [16, 17, 23, 64, 65])
def test_output_length_formula(t):
    enc = tiny()
    _, lengths = enc(torch.randn(1, 80, t), torch.tensor([t]))
    expected = t
    for _ in range(3):
        expected = (expected - 1) // 2 + 1
    assert lengths.item() == expected


def test_limited_context_masks_a_band():
    enc = tiny(att_context_size=[2, 1])
    pad, att = enc.att_masks(torch.tensor([6]), 6)
    allowed = ~att[0]
    for i in range(6):
        for j in range(6):
            assert bool(allowed[i, j]) == (-2 <= j - i <= 1)


def test_variants_build_and_run():
    x, lengths = torch.randn(2, 80, 48), torch.tensor([48, 30])
    for over in [dict(self_attention_model="abs_pos"), dict(untie_biases=False), dict(conv_norm_type="layer_norm"),
                 dict(conv_norm_type="group_norm4"), dict(conv_context_size="causal"), dict(conv_context_size=[6, 2]),
                 dict(feat_out=16), dict(subsampling_conv_channels=-1), dict(xscaling=False, use_bias=False)]:
        out, _ = tiny(**over)(x, lengths)
        assert torch.isfinite(out).all(), over


def test_stochastic_depth_probabilities_match_nemo():
    assert compute_stochastic_depth_drop_probs(4, 0.3, "linear", 1) == pytest.approx([0, 0.1, 0.2, 0.3])
    assert compute_stochastic_depth_drop_probs(4, 0.3, "linear", 3) == pytest.approx([0, 0, 0, 0.3])
    assert compute_stochastic_depth_drop_probs(4, 0.3, "uniform", 1) == pytest.approx([0, 0.3, 0.3, 0.3])
    with pytest.raises(ValueError, match=r"stochastic_depth_drop_prob has to be in \[0, 1\)"):
        compute_stochastic_depth_drop_probs(4, 1.0)
    with pytest.raises(ValueError, match="stochastic_depth_mode has to be one of"):
        compute_stochastic_depth_drop_probs(4, 0.1, "cubic")
    with pytest.raises(ValueError, match=r"stochastic_depth_start_layer has to be in \[1, num layers\]"):
        compute_stochastic_depth_drop_probs(4, 0.1, "linear", 0)


@pytest.mark.parametrize("over,needle", [(dict(subsampling="foo"), "subsampling='foo'"),
                                         (dict(subsampling_factor=3), "subsampling_factor=3"),
                                         (dict(self_attention_model="x"), "self_attention_model='x'"),
                                         (dict(conv_norm_type="x"), "conv_norm_type='x'"),
                                         (dict(conv_context_size=[1, 1]), "conv_context_size"),
                                         (dict(attention_impl="cuda"), "attention_impl='cuda'")])
def test_bad_options_name_the_option_and_allowed_values(over, needle):
    with pytest.raises(ValueError, match=needle) as e:
        tiny(**over)
    assert "allowed" in str(e.value)


def test_bad_inputs_raise_value_errors():
    enc = tiny()
    with pytest.raises(ValueError, match="feat_in=80"):
        enc(torch.randn(1, 40, 32), torch.tensor([32]))
    with pytest.raises(ValueError, match="must lie in"):
        enc(torch.randn(1, 80, 32), torch.tensor([33]))
    with pytest.raises(ValueError, match="needs at least"):
        enc(torch.randn(1, 80, 4), torch.tensor([4]))


def test_compile_layers_keeps_keys_outputs_and_gradients():
    """trainer.compile: every layer compiled in place (aot_eager: dynamo + AOT autograd, no C++ compiler needed)."""
    torch.manual_seed(0)
    eager = ConformerEncoder(ConformerEncoderConfig(**TINY)).train()
    compiled = ConformerEncoder(ConformerEncoderConfig(**TINY)).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_layers(backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for T, lengths in ((96, [96, 61]), (130, [130, 7])):  # a second length: dynamic shapes, no wrong reuse
        x = torch.randn(2, 80, T)
        outs = []
        for enc in (eager, compiled):
            y, n = enc(x, torch.tensor(lengths))
            (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
            outs.append((y, n, {k: p.grad.clone() for k, p in enc.named_parameters()}))
            enc.zero_grad(set_to_none=True)
        (y0, n0, g0), (y1, n1, g1) = outs
        assert torch.equal(n0, n1)
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-5, msg=k)
    assert all(layer._compiled_call_impl is not None for layer in compiled.layers)
