"""The encoder with `attention_impl` and `conv_impl` set to triton equals the torch path (same weights).

Runs on CPU under TRITON_INTERPRET=1 at tiny sizes, on a padded batch with an odd length."""
import pytest
import torch

from nest_ssl.conformer.encoder import ConformerEncoder, ConformerEncoderConfig

TINY = dict(feat_in=80, n_layers=2, d_model=32, n_heads=2, subsampling="dw_striding", subsampling_factor=8,
            subsampling_conv_channels=8, conv_kernel_size=9, dropout=0.0, dropout_pre_encoder=0.0, dropout_att=0.0,
            dropout_emb=0.0)


def _run(impl, x, lengths, train, state=None):
    torch.manual_seed(0)
    enc = ConformerEncoder(ConformerEncoderConfig(**TINY, attention_impl=impl, conv_impl=impl)).train(train)
    if state is not None:
        enc.load_state_dict(state)
    out, out_len = enc(x, lengths)
    out.square().mean().backward()
    return enc, out, out_len


@pytest.mark.numerics
@pytest.mark.parametrize("train", [False, True])
def test_triton_kernels_in_the_encoder_match_torch(triton_interpret, train):
    x = torch.randn(2, 80, 136)
    lengths = torch.tensor([136, 77])
    state = ConformerEncoder(ConformerEncoderConfig(**TINY)).state_dict()
    ref_enc, ref, ref_len = _run("torch", x, lengths, train, state)
    enc, out, out_len = _run("triton", x, lengths, train, state)
    assert enc.kernel_impls == {"attention": ("triton", "requested"), "conv": ("triton", "requested")}
    # The kernels really ran, once per layer (not the torch path under a triton label). Eval-mode BatchNorm with
    # gradients is the one case the conv kernel does not implement (its folded eval kernel has no backward).
    assert enc.kernel_calls() == {"attention": 2, "conv": 2 if train else 0}
    assert ref_enc.kernel_calls() == {"attention": 0, "conv": 0}
    assert torch.equal(out_len, ref_len)
    for b, n in enumerate(out_len.tolist()):
        torch.testing.assert_close(out[b, :, :n], ref[b, :, :n], rtol=1e-4, atol=1e-5)
    grads = dict(ref_enc.named_parameters())
    for name, p in enc.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


def test_triton_conv_with_a_non_batchnorm_norm_is_a_clear_error():
    with pytest.raises(ValueError, match="conv_impl='triton' supports conv_norm_type='batch_norm' only"):
        ConformerEncoder(ConformerEncoderConfig(**TINY, conv_norm_type="layer_norm", conv_impl="triton"))


def test_compiled_layers_run_the_triton_kernels_as_they_are(triton_interpret):
    """trainer.compile with Triton kernels: the compiler-disabled kernel calls break the graph and run unchanged."""
    x, lengths = torch.randn(2, 80, 136), torch.tensor([136, 77])
    state = ConformerEncoder(ConformerEncoderConfig(**TINY)).state_dict()
    ref_enc, ref, _ = _run("triton", x, lengths, True, state)
    torch.manual_seed(0)
    enc = ConformerEncoder(ConformerEncoderConfig(**TINY, attention_impl="triton", conv_impl="triton")).train()
    enc.load_state_dict(state)
    enc.compile_layers(backend="aot_eager")
    out, _ = enc(x, lengths)
    out.square().mean().backward()
    assert enc.kernel_calls() == {"attention": 2, "conv": 2}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grads = dict(ref_enc.named_parameters())
    for name, p in enc.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_eval_without_gradients_runs_the_folded_conv_kernel(triton_interpret):
    enc = ConformerEncoder(ConformerEncoderConfig(**TINY, attention_impl="triton", conv_impl="triton")).eval()
    with torch.no_grad():
        enc(torch.randn(2, 80, 136), torch.tensor([136, 77]))
    assert enc.kernel_calls() == {"attention": 2, "conv": 2}


def test_explicit_triton_without_importable_kernels_raises_with_the_import_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "triton", None)  # as if Triton were not installed
    monkeypatch.delitem(sys.modules, "nest_ssl.kernels.rel_pos_attention", raising=False)
    monkeypatch.delitem(sys.modules, "nest_ssl.kernels.conv_module", raising=False)
    with pytest.raises(ImportError, match="Triton attention kernel .* does not import: .*triton"):
        ConformerEncoder(ConformerEncoderConfig(**TINY, attention_impl="triton", conv_impl="torch"))
    enc = ConformerEncoder(ConformerEncoderConfig(**TINY, attention_impl="auto", conv_impl="auto"))
    assert enc.kernel_impls["attention"][0] == "torch"  # auto never fails


def test_auto_resolves_once_per_device_and_logs_why(caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="nest_ssl.conformer.encoder"):
        enc = ConformerEncoder(ConformerEncoderConfig(**TINY))
        enc.float()  # same device and choice: resolved again, not logged again
    assert enc.kernel_impls == {"attention": ("torch", "auto: parameters on cpu (the kernels need CUDA)"),
                                "conv": ("torch", "auto: parameters on cpu (the kernels need CUDA)")}
    lines = [r.getMessage() for r in caplog.records if "encoder kernels" in r.getMessage()]
    assert lines == ["encoder kernels on cpu: attention=torch (auto: parameters on cpu (the kernels need CUDA)), "
                     "conv=torch (auto: parameters on cpu (the kernels need CUDA))"]
    enc = ConformerEncoder(ConformerEncoderConfig(**TINY, conv_norm_type="layer_norm"))
    assert enc.kernel_impls["conv"] == ("torch", "auto: conv_norm_type='layer_norm' (the kernel implements batch_norm)")


def test_triton_attention_needs_rel_pos():
    with pytest.raises(ValueError, match="attention_impl='triton' supports self_attention_model='rel_pos' only"):
        ConformerEncoder(ConformerEncoderConfig(**TINY, self_attention_model="abs_pos", attention_impl="triton"))
