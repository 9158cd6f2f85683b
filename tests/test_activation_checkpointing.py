"""Activation checkpointing of Conformer layers gives the same outputs, gradients and BatchNorm statistics as
no checkpointing, with dropout > 0: torch path, Triton kernels under the interpreter, compiled layers."""
import pytest
import torch

from nest_ssl.conformer.checkpointing import parse_mode
from nest_ssl.conformer.encoder import ConformerEncoder, ConformerEncoderConfig

TINY = dict(feat_in=80, n_layers=3, d_model=32, n_heads=2, subsampling="dw_striding", subsampling_factor=8,
            subsampling_conv_channels=8, conv_kernel_size=9, dropout=0.2, dropout_pre_encoder=0.1, dropout_att=0.2,
            dropout_emb=0.0)


def _step(mode, impl="torch", compile_backend=None, seed=0, n_layers=3, frames=136):
    """One training forward/backward from the same weights and RNG state -> (output, grads, BN buffers, #recomputes)."""
    torch.manual_seed(123)
    cfg = ConformerEncoderConfig(**{**TINY, "n_layers": n_layers}, attention_impl=impl, conv_impl=impl)
    enc = ConformerEncoder(cfg).train()
    enc.set_activation_checkpointing(mode)
    if compile_backend:
        enc.compile_layers(backend=compile_backend)
    calls = []
    for layer in enc.layers:  # counts layer runs: a checkpointed layer runs twice
        layer.register_forward_pre_hook(lambda m, a: calls.append(1))
    x = torch.randn(2, 80, frames, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([frames, frames * 5 // 9])
    torch.manual_seed(seed)
    out, _ = enc(x, lengths)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    bn = {n: b.clone() for n, b in enc.named_buffers() if "batch_norm" in n}
    return out.detach(), grads, bn, len(calls)


def _assert_same(got, ref, exact=True):
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[0], ref[0], **tol)
    assert got[1].keys() == ref[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], **tol, msg=name)
    for name in ref[2]:  # BatchNorm statistics updated once, not once more by the recompute
        torch.testing.assert_close(got[2][name], ref[2][name], **tol, msg=name)


@pytest.mark.parametrize("mode,runs", [("full", 6), ("every_2", 5)])
def test_checkpointing_equals_no_checkpointing_with_dropout(mode, runs):
    ref = _step("none")
    got = _step(mode)
    assert ref[3] == 3 and got[3] == runs  # 3 layers; full reruns all 3, every_2 reruns layers 0 and 2
    _assert_same(got, ref)
    assert not torch.equal(_step("none", seed=1)[0], ref[0])  # dropout is active: another seed differs


def test_checkpointing_with_triton_kernels_and_dropout(triton_interpret):
    ref = _step("none", impl="triton", n_layers=1, frames=88)  # interpreter: one layer, 11 frames after subsampling
    got = _step("full", impl="triton", n_layers=1, frames=88)
    assert got[3] == 2
    _assert_same(got, ref)  # the attention kernel's Philox seed comes back with the restored CPU generator


def test_checkpointing_with_compiled_layers():
    ref = _step("none", compile_backend="aot_eager", n_layers=1, frames=88)
    got = _step("full", compile_backend="aot_eager", n_layers=1, frames=88)
    _assert_same(got, ref, exact=False)


def test_no_recompute_in_eval_or_no_grad():
    torch.manual_seed(0)
    enc = ConformerEncoder(ConformerEncoderConfig(**TINY)).eval()
    enc.set_activation_checkpointing("full")
    x, lengths = torch.randn(1, 80, 64), torch.tensor([64])
    with torch.no_grad():
        a, _ = enc(x, lengths)
    enc.set_activation_checkpointing("none")
    with torch.no_grad():
        b, _ = enc(x, lengths)
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["every_0", "some", "every_k", ""])
def test_bad_mode_names_the_allowed_values(mode):
    with pytest.raises(ValueError, match="none | full | every_<k>"):
        parse_mode(mode)
