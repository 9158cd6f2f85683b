"""nest_ssl.export: pretrained models in (.nemo, NeMo .ckpt, ours) and out (.nemo, torch.export, ONNX)."""
import copy
import json
import warnings

import numpy as np
import pytest
import torch
import yaml

from conftest import PARITY
from nest_ssl import export
from nest_ssl.nemo_compat import TARGETS
from nest_ssl.nemo_io import read_nemo, write_nemo

NEST_TINY = PARITY / "nest_tiny"


def tiny_model_cfg() -> dict:
    return copy.deepcopy(json.loads((NEST_TINY / "config.json").read_text())["model"])


def parity_state() -> dict:
    with np.load(NEST_TINY / "state_dict.npz") as z:
        return {k: torch.from_numpy(z[k]) for k in z.files}


def tiny_model():
    """The nest_tiny model with NeMo's weights."""
    model = export.build_model(tiny_model_cfg())
    model.load_state_dict(parity_state(), strict=True)
    model.model_cfg = tiny_model_cfg()
    return model.eval()


def assert_same_state(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---- .nemo in and out ----------------------------------------------------------------------------------------


def test_ours_to_nemo_to_ours_is_bit_identical(tmp_path):
    model = tiny_model()
    path = export.save_nemo(model, model.model_cfg, tmp_path / "tiny.nemo")
    back = export.load_pretrained(path)
    assert type(back) is type(model)
    assert_same_state(model.state_dict(), back.state_dict())
    assert back.state_dict()["quantizer.codebooks"].dtype == torch.float64  # NeMo keeps codebooks in float64


def test_saved_config_has_nemo_targets_target_and_version(tmp_path):
    model = tiny_model()
    cfg = tiny_model_cfg()
    cfg["masking"]["_target_"] = "nest_ssl.nest.masking.RandomBlockMasking"  # our own path goes out as NeMo's
    del cfg["target"], cfg["nemo_version"]
    saved, _ = read_nemo(export.save_nemo(model, cfg, tmp_path / "m.nemo"))
    assert saved == tiny_model_cfg()  # the NeMo-written fixture config, key for key
    targets = [v["_target_"] for v in saved.values() if isinstance(v, dict) and "_target_" in v]
    assert targets and all(t.startswith("nemo.") and t in TARGETS for t in targets)


@pytest.mark.parametrize("bad, needle", [({"_target_": "os.system"}, "os.system"),
                                         ("${model.sample_rate}", "unresolved")])
def test_save_nemo_refuses_unknown_targets_and_unresolved_values(tmp_path, bad, needle):
    model = tiny_model()
    cfg = tiny_model_cfg()
    cfg["extra"] = bad
    with pytest.raises(ValueError, match=needle):
        export.save_nemo(model, cfg, tmp_path / "m.nemo")
    assert not (tmp_path / "m.nemo").exists()


def test_nemo_written_archive_from_parity_state_loads_strict(tmp_path):
    state = parity_state()
    path = write_nemo(tmp_path / "nemo_made.nemo", tiny_model_cfg(), state)  # what NeMo's save_to writes
    model = export.load_pretrained(path)
    assert_same_state(state, model.state_dict())
    assert not model.training


def test_missing_keys_are_refused(tmp_path):
    model = tiny_model()
    state = model.state_dict()
    state.pop(next(k for k in state if k.startswith("encoder.")))
    path = write_nemo(tmp_path / "m.nemo", tiny_model_cfg(), state)
    with pytest.raises(RuntimeError, match="Missing key"):
        export.load_pretrained(path)


def test_our_training_checkpoint_loads(tmp_path):
    model = tiny_model()
    run_cfg = {"name": "x", "model": tiny_model_cfg(), "trainer": {"max_steps": 1}}
    torch.save({"format_version": 1, "state_dict": model.state_dict(), "global_step": 3, "config": run_cfg},
               tmp_path / "x-last.ckpt")
    back = export.load_pretrained(tmp_path / "x-last.ckpt")
    assert_same_state(model.state_dict(), back.state_dict())


def test_checkpoint_without_model_config_is_refused(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(1)}}, tmp_path / "w.ckpt")
    with pytest.raises(ValueError, match="no model config"):
        export.load_pretrained(tmp_path / "w.ckpt")


# ---- torch.export / ONNX -------------------------------------------------------------------------------------


def test_export_encoder_pt2_matches_eager_on_random_lengths(tmp_path):
    model = tiny_model()
    info = export.export_encoder(model, tmp_path / "enc.pt2", max_time=4000)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rep = export.verify_export(model, info["path"], n=4, max_time=300)
    print(f"\npt2 export {info['seconds']:.2f} s, max rel err {rep['max_rel_err']:.2e}")
    assert rep["lengths_equal"] and rep["max_rel_err"] <= 1e-5
    # torch.export.load's "The given buffer is not writable" (it reads the weights from bytes) is filtered
    assert not [w for w in seen if "buffer is not writable" in str(w.message)]


def test_export_with_preprocessor_matches_eager_or_says_why(tmp_path):
    model = tiny_model()
    try:
        info = export.export_encoder(model, tmp_path / "enc_pre.pt2", with_preprocessor=True)
    except RuntimeError as e:  # the STFT front-end may not trace; the error must say so and what to do instead
        assert "without --with-preprocessor" in str(e)
        pytest.skip(f"preprocessor does not export: {str(e)[:200]}")
    rep = export.verify_export(model, info["program"], with_preprocessor=True, n=3, max_time=8000)
    print(f"\npt2+preprocessor {info['seconds']:.2f} s, rel err {rep['max_rel_err']:.2e}")
    assert rep["lengths_equal"] and rep["max_rel_err"] <= 1e-4


def test_bad_export_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="allowed"):
        export.export_encoder(tiny_model(), tmp_path / "x", fmt="tflite")


def test_onnx_export(tmp_path):
    if not export.onnx_available():
        pytest.skip("the onnx extra (onnx, onnxscript) is not installed")
    info = export.export_encoder(tiny_model(), tmp_path / "enc.onnx", fmt="onnx", max_time=4000)
    assert info["path"].stat().st_size > 0


@pytest.mark.gpu
def test_export_matches_eager_on_cuda(tmp_path):
    model = tiny_model().cuda()
    info = export.export_encoder(model, tmp_path / "enc.pt2", device="cuda", max_time=4000)
    rep = export.verify_export(model, info["program"], n=4, device="cuda", max_time=300)
    assert rep["lengths_equal"] and rep["max_rel_err"] <= 1e-4


def test_yaml_written_is_plain(tmp_path):
    model = tiny_model()
    path = export.save_nemo(model, model.model_cfg, tmp_path / "m.nemo")
    import tarfile

    with tarfile.open(path) as tar:
        text = tar.extractfile("./model_config.yaml").read().decode()
    assert "!!python" not in text and yaml.safe_load(text)["target"].startswith("nemo.collections.asr.models")


@pytest.mark.parametrize("samples", [4960, 4961])  # 32 frames (a multiple of pad_to=16) and 32 + 1 sample
def test_export_wrapper_equals_model_preprocessor_then_encoder(samples):
    model = tiny_model()
    wrapper = export.EncoderForExport(model, with_preprocessor=True)
    x, lens = export.example_inputs(wrapper, 2, samples, lengths=[samples, samples - 900])
    with torch.no_grad():
        got, got_len = wrapper(x, lens)
        ref, ref_len = model.encoder(*model.preprocessor(x, lens))
    assert torch.equal(got_len, ref_len) and got.shape == ref.shape
    assert torch.equal(got, ref)


def test_parity_adapter_save_and_load_nemo_round_trip(tmp_path):
    from nest_ssl.testing import nemo_parity

    state = {k: v.numpy() for k, v in parity_state().items()}
    path = nemo_parity.save_nemo(tiny_model_cfg(), state, tmp_path / "p.nemo")
    cfg, back = nemo_parity.load_nemo(path)
    assert cfg == tiny_model_cfg() and list(back) == list(state)
    assert all(back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k]) for k in state)


def test_verify_export_reports_a_wrong_program():
    model = tiny_model()
    eager = export.EncoderForExport(model)

    def off_by_1e3(x, lengths):
        y, n = eager(x, lengths)
        return y * 1.001, n

    rep = export.verify_export(model, off_by_1e3, n=2, max_time=64)
    assert 0.9e-3 < rep["max_rel_err"] < 1.1e-3 and rep["lengths_equal"]


def test_export_cli_writes_a_nemo_copy(tmp_path):
    import runpy

    model = tiny_model()
    src = export.save_nemo(model, model.model_cfg, tmp_path / "a.nemo")
    main = runpy.run_path(str(PARITY.parents[2] / "scripts" / "export.py"))["main"]
    assert main([str(src), "--out", str(tmp_path / "b.nemo"), "--format", "nemo"]) == 0
    assert_same_state(model.state_dict(), export.load_pretrained(tmp_path / "b.nemo").state_dict())


def test_init_from_nemo_model_and_ptl_ckpt_follow_nemo_semantics(tmp_path):
    src = tiny_model()
    nemo = export.save_nemo(src, src.model_cfg, tmp_path / "src.nemo")
    torch.save({"state_dict": src.state_dict(), "config": {"model": src.model_cfg}}, tmp_path / "ours.ckpt")
    torch.manual_seed(123)
    dst = export.build_model(tiny_model_cfg())
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    lines = export.init_from_pretrained(dst, {"init_from_nemo_model": {
        "enc": {"path": str(nemo), "include": ["encoder."], "exclude": ["encoder.layers.1."]}}})
    for k, v in dst.state_dict().items():
        want = src.state_dict()[k] if ("encoder." in k and "encoder.layers.1." not in k) else before[k]
        assert torch.equal(v, want), k
    assert len(lines) == 1 and "loaded" in lines[0]
    export.init_from_pretrained(dst, {"init_from_ptl_ckpt": str(tmp_path / "ours.ckpt")})  # a path: everything
    assert_same_state(src.state_dict(), dst.state_dict())
    with pytest.raises(ValueError, match="path"):
        export.init_from_pretrained(dst, {"init_from_nemo_model": {"enc": {"include": ["x"]}}})


def test_checkpoint_config_interpolations_are_resolved(tmp_path):
    model = tiny_model()
    cfg = tiny_model_cfg()
    cfg["preprocessor"]["sample_rate"] = "${model.sample_rate}"
    torch.save({"state_dict": model.state_dict(), "config": {"model": cfg}}, tmp_path / "c.ckpt")
    got_cfg, _ = export.read_checkpoint(tmp_path / "c.ckpt")
    assert got_cfg["preprocessor"]["sample_rate"] == 16000


def test_export_cli_verifies_the_onnx_file_itself_with_onnxruntime(tmp_path, capsys):
    if not export.onnx_available() or not export.onnxruntime_available():
        pytest.skip("needs the onnx extra (onnx, onnxscript, onnxruntime)")
    import runpy

    import onnx
    from onnx import numpy_helper

    model = tiny_model()
    src, out = export.save_nemo(model, model.model_cfg, tmp_path / "a.nemo"), tmp_path / "enc.onnx"
    main = runpy.run_path(str(PARITY.parents[2] / "scripts" / "export.py"))["main"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main([str(src), "--out", str(out), "--format", "onnx", "--verify", "1", "--max-time", "4000"]) == 0
    captured = capsys.readouterr()
    assert f"verify {out} with onnxruntime" in captured.out
    # torch's notes the user cannot act on are filtered (4 "torchvision is not installed" lines, a LeafSpec warning)
    assert "torchvision is not installed" not in captured.err + captured.out
    assert not [w for w in seen if "LeafSpec" in str(w.message)]

    # A damaged file must show up in the check: it is the file that runs, not the torch program it came from.
    proto = onnx.load(str(out))
    for t in proto.graph.initializer:
        w = numpy_helper.to_array(t)
        if w.dtype == np.float32 and w.size > 1:
            t.CopyFrom(numpy_helper.from_array(w * 1.5, t.name))
    onnx.save(proto, str(out))
    rep = export.verify_export(model, out, n=1, max_time=64)
    assert rep["checked"].startswith(f"{out} with onnxruntime") and rep["max_rel_err"] > 1e-2
