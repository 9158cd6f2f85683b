"""Files NeMo 2.6.2 itself wrote (tests/fixtures/nemo_files, see its README): a Lightning `.ckpt` after 3 steps of
NeMo's pretraining example and the `.nemo` of the same run. They load without NeMo/omegaconf/Lightning, reproduce
NeMo's eval outputs, continue training from the `.ckpt`'s AdamW state, and refuse damaged or foreign content."""
import io
import pickle
import runpy
import zipfile

import numpy as np
import pytest
import torch

from conftest import FIXTURES
from nest_ssl import checkpoint, export
from nest_ssl.config import from_dict
from nest_ssl.nemo_io import NemoFileError, _OmegaNode, read_nemo, read_ptl_checkpoint, read_torch_zip
from nest_ssl.optim import OptimConfig, build_optimizer, build_scheduler

FILES = FIXTURES / "nemo_files"
CKPT, NEMO = FILES / "nest_tiny_train-last.ckpt", FILES / "nest_tiny_train.nemo"
EXPORT_SCRIPT = FIXTURES.parents[1] / "scripts" / "export.py"


def _walk(obj):
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)


def nemo_outputs(model) -> dict:
    """NeMo's outputs.npz recipe: preprocessor -> encoder, quantizer on the clean features, decoder."""
    with np.load(FILES / "batch.npz") as b:
        x, lengths = torch.from_numpy(b["waveforms"]), torch.from_numpy(b["lengths"])
    with torch.no_grad():
        feats, feats_len = model.preprocessor(x, lengths)
        encoded, encoded_len = model.encoder(feats, feats_len)
        _, tokens = model.quantizer(feats)
        log_probs = model.decoder(encoded)
    return {"features": feats, "features_len": feats_len, "encoded": encoded, "encoded_len": encoded_len,
            "tokens": tokens, "log_probs": log_probs}


def assert_matches_nemo(got: dict, rtol: float = 1e-5) -> dict:
    """Relative error (max |diff| / max |ref|) over valid frames per float tensor; lengths and tokens exact."""
    with np.load(FILES / "outputs.npz") as z:
        ref = {k: torch.from_numpy(z[k]) for k in z.files}
    assert torch.equal(got["features_len"], ref["features_len"]) and torch.equal(got["encoded_len"], ref["encoded_len"])
    errs = {}
    for key, time_dim, lens in (("features", 2, ref["features_len"]), ("encoded", 2, ref["encoded_len"]),
                                ("log_probs", 1, ref["encoded_len"])):
        assert got[key].shape == ref[key].shape, key
        valid = torch.arange(ref[key].shape[time_dim])[None, :] < lens[:, None]  # (B, T)
        shape = [valid.shape[0]] + [valid.shape[1] if d == time_dim else 1 for d in range(1, ref[key].ndim)]
        valid = valid.reshape(shape)
        diff = ((got[key].double() - ref[key].double()).abs() * valid).max()
        errs[key] = float(diff / (ref[key].double().abs() * valid).max())
        assert errs[key] <= rtol, (key, errs[key])
    tok_valid = torch.arange(ref["tokens"].shape[1])[None, :] < ref["encoded_len"][:, None]  # padding groups tie
    assert torch.equal(got["tokens"][tok_valid], ref["tokens"][tok_valid])
    return errs


def test_fixtures_are_the_bytes_nemo_wrote():
    import hashlib
    import re

    listed = dict((name, sha) for sha, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", (FILES / "README.md").read_text(),
                                                          re.M))
    assert len(listed) == 4
    for name, sha in listed.items():
        assert hashlib.sha256((FILES / name).read_bytes()).hexdigest() == sha, name


@pytest.mark.numerics
@pytest.mark.parametrize("path", [CKPT, NEMO], ids=["ckpt", "nemo"])
def test_nemo_written_file_reproduces_nemo_outputs(path):
    model = export.load_pretrained(path)
    errs = assert_matches_nemo(nemo_outputs(model))
    print(f"\n{path.name}: rel err vs NeMo " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))


def test_ckpt_reads_as_plain_python_equal_to_the_nemo():
    ckpt = read_ptl_checkpoint(CKPT)
    assert not any(isinstance(o, _OmegaNode) or (isinstance(o, type) and issubclass(o, _OmegaNode))
                   for o in _walk(ckpt))
    assert ckpt["hparams_type"] == "omegaconf.dictconfig.DictConfig" and ckpt["global_step"] == 3
    cfg = ckpt["hyper_parameters"]["cfg"]
    assert type(cfg) is dict and type(cfg["train_ds"]["manifest_filepath"]) is str
    assert cfg["target"].endswith("EncDecDenoiseMaskedTokenPredModel") and cfg["nemo_version"] == "2.6.2"
    nemo_cfg, nemo_state = read_nemo(NEMO)
    assert cfg == nemo_cfg
    assert list(nemo_state) == list(ckpt["state_dict"]) and len(nemo_state) == 99
    for k, v in ckpt["state_dict"].items():
        assert v.dtype == nemo_state[k].dtype and torch.equal(v, nemo_state[k]), k
    assert ckpt["state_dict"]["quantizer.codebooks"].dtype == torch.float64


def test_export_script_converts_both_files_to_nemo_and_to_our_checkpoint(tmp_path):
    main = runpy.run_path(str(EXPORT_SCRIPT))["main"]
    reference = export.load_pretrained(CKPT).state_dict()
    for src in (CKPT, NEMO):
        for fmt in ("nemo", "ckpt"):
            out = tmp_path / f"{src.stem}.{fmt}"
            assert main([str(src), "--out", str(out), "--format", fmt]) == 0
            got = export.load_pretrained(out).state_dict()
            assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in reference.items())


@pytest.mark.parametrize("key,path", [("init_from_ptl_ckpt", CKPT), ("init_from_nemo_model", NEMO)])
def test_init_from_loads_the_weights_of_nemo_written_files(key, path):
    cfg, _ = export.read_checkpoint(path)
    torch.manual_seed(5)
    model = export.build_model(cfg)
    lines = export.init_from_pretrained(model, {key: str(path)})
    assert "loaded 99 tensors" in lines[0] and "0 model keys not in it" in lines[0]
    assert_matches_nemo(nemo_outputs(model.eval()))


def test_converted_ckpt_continues_nemo_training_state(tmp_path):
    nemo = read_ptl_checkpoint(CKPT)
    out = export.to_training_checkpoint(CKPT, tmp_path / "resume-last.ckpt")
    state = checkpoint.load(out)  # our resume path: torch.load(weights_only=True)
    cfg = state["config"]["model"]
    model = export.build_model(cfg).train()
    optim_cfg = from_dict(OptimConfig, cfg["optim"], "model.optim")
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, 100)  # a longer run than NeMo's max_steps=3
    checkpoint.restore(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None)
    assert state["global_step"] == 3 and scheduler.last_epoch == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(nemo["lr_schedulers"][0]["_last_lr"][0], rel=1e-12)
    nemo_opt = nemo["optimizer_states"][0]["state"]
    assert sorted(optimizer.state_dict()["state"]) == sorted(nemo_opt) and len(nemo_opt) == 88
    params = list(model.parameters())
    for i, st in nemo_opt.items():
        assert torch.equal(optimizer.state[params[i]]["exp_avg_sq"], st["exp_avg_sq"]), i
    with np.load(FILES / "batch.npz") as b:
        audio, lengths = torch.from_numpy(b["waveforms"]), torch.from_numpy(b["lengths"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(input_signal=audio, input_signal_length=lengths, noisy_input_signal=audio,
                noisy_input_signal_length=lengths, apply_mask=True, generator=torch.Generator().manual_seed(0))
    loss, _ = model.compute_loss(*out)
    loss.backward()
    optimizer.step()
    scheduler.step()
    assert torch.isfinite(loss) and float(optimizer.state[params[0]]["step"]) == 4.0
    assert not torch.equal(before["encoder.layers.0.feed_forward1.linear1.weight"],
                           model.encoder.layers[0].feed_forward1.linear1.weight)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5.0 * 64 ** -0.5 * 4 * 10 ** -1.5, rel=1e-12)


# ---- damaged and foreign files -----------------------------------------------------------------------------


def _sweep(size: int, n: int = 41) -> list[int]:
    """n offsets spread over the file plus the edges (an empty file, one byte short)."""
    return sorted({0, 1, size - 1, *np.linspace(1, size - 1, n).astype(int).tolist()})


def _tar_layout(path) -> tuple[int, list[int]]:
    """(offset just past the end-of-archive marker, member header/data boundaries +-1). What follows the marker is
    record padding without data."""
    import tarfile

    with tarfile.open(path) as tar:
        edges = [e + d for m in tar.getmembers() for e in (m.offset, m.offset_data, m.offset_data + m.size)
                 for d in (-1, 0, 1)]
        return tar.offset + 2 * tarfile.BLOCKSIZE, edges + [tar.offset, tar.offset + 512]


def _zip_edges(path) -> list[int]:
    """Offsets around each member's header and data end, and inside the central directory at the end."""
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    size = path.stat().st_size
    return [i.header_offset + 1 for i in infos[:5]] + [infos[-1].header_offset + 40, size - 22, size - 100]


@pytest.mark.parametrize("path", [CKPT, NEMO], ids=["ckpt", "nemo"])
def test_file_cut_at_any_offset_raises_nemo_file_error_naming_it(tmp_path, path):
    data = path.read_bytes()
    end, edges = _tar_layout(path) if path.suffix == ".nemo" else (len(data), _zip_edges(path))
    offsets = sorted(set(_sweep(end) + [e for e in edges if 0 <= e < end]))
    cut = tmp_path / f"cut{path.suffix}"
    for offset in offsets:
        cut.write_bytes(data[:offset])
        with pytest.raises(NemoFileError, match=str(cut)):
            export.load_pretrained(cut)
    print(f"\n{path.name}: {len(offsets)} cut offsets in [0, {end}) each raised NemoFileError")


def test_nemo_cut_in_the_record_padding_reads_the_same_weights(tmp_path):
    data, (end, _) = NEMO.read_bytes(), _tar_layout(NEMO)
    assert end < len(data)  # NeMo's tarfile pads to a 10240-byte record
    cut = tmp_path / "padded.nemo"
    cut.write_bytes(data[:end])
    _, state = read_nemo(cut)
    _, ref = read_nemo(NEMO)
    assert all(torch.equal(state[k], ref[k]) for k in ref)


def _repickle(obj) -> bytes:
    buf = io.BytesIO()
    pickle.dump(obj, buf, protocol=2)
    return buf.getvalue()


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("member", ["archive/data.pkl", "model_weights/data.pkl"])
def test_disallowed_global_names_file_and_global_without_weights_only_advice(tmp_path, member):
    path = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, _repickle({"state_dict": {}, "x": _Evil()}))
    with pytest.raises(NemoFileError) as e:
        export.load_pretrained(path)
    msg = str(e.value)
    assert str(path) in msg and "posix.system" in msg and "not on the allow-list" in msg
    assert "weights_only" not in msg


def test_disallowed_global_inside_a_nemo_names_the_member(tmp_path):
    import tarfile

    weights = io.BytesIO()
    with zipfile.ZipFile(weights, "w") as zf:
        zf.writestr("model_weights/data.pkl", _repickle({"w": _Evil()}))
    path = tmp_path / "evil.nemo"
    with tarfile.open(path, "w:") as tar:
        for name, blob in (("./model_config.yaml", b"a: 1\n"), ("./model_weights.ckpt", weights.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(NemoFileError, match=r"evil\.nemo:\./model_weights\.ckpt: .*posix\.system") as e:
        read_nemo(path)
    assert "weights_only" not in str(e.value)


def test_storage_of_the_wrong_size_is_refused(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    path = tmp_path / "short.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        for n in src.namelist():
            zf.writestr(n, src.read(n)[:-4] if "/data/" in n else src.read(n))
    with pytest.raises(NemoFileError, match="has 12 bytes, expected 4 x 4"):
        read_torch_zip(path)
