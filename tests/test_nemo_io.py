"""`.nemo` and Lightning `.ckpt` reading/writing: round trips, NeMo's layouts, unsafe archives refused."""
import io
import pickle
import tarfile
import zipfile

import pytest
import torch
import yaml

from conftest import FIXTURES
from nest_ssl import export
from nest_ssl.nemo_io import NemoFileError, read_nemo, read_ptl_checkpoint, write_nemo

CFG = {"sample_rate": 16000, "encoder": {"_target_": "nemo.collections.asr.modules.ConformerEncoder", "d_model": 8},
       "target": "nemo.collections.asr.models.ssl_models.EncDecDenoiseMaskedTokenPredModel"}


def _state():
    g = torch.Generator().manual_seed(0)
    return {"encoder.w": torch.randn(3, 4, generator=g),
            "quantizer.codebooks": torch.randn(1, 6, 2, generator=g).double(),
            "bn.num_batches_tracked": torch.tensor(5)}


def test_round_trip_is_bit_identical(tmp_path):
    sd = _state()
    path = write_nemo(tmp_path / "m.nemo", CFG, sd)
    cfg, got = read_nemo(path)
    assert cfg == CFG
    assert list(got) == list(sd)
    for k in sd:
        assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k])


def test_written_archive_has_nemo_layout_and_loads_weights_only(tmp_path):
    path = write_nemo(tmp_path / "m.nemo", CFG, _state())
    with tarfile.open(path, "r:") as tar:  # uncompressed, like NeMo's
        assert tar.getnames() == [".", "./model_config.yaml", "./model_weights.ckpt"]
        weights = tar.extractfile("./model_weights.ckpt").read()
    sd = torch.load(io.BytesIO(weights), weights_only=True)
    assert type(sd) is dict and sd["quantizer.codebooks"].dtype == torch.float64


def _tar(path, members, mode="w:"):
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _weights_bytes():
    buf = io.BytesIO()
    torch.save(_state(), buf)
    return buf.getvalue()


@pytest.mark.parametrize("prefix,mode", [("", "w:"), ("./", "w:"), ("./", "w:gz"), ("", "w:gz")])
def test_reads_plain_and_gzipped_with_or_without_dot_slash(tmp_path, prefix, mode):
    path = _tar(tmp_path / "m.nemo", [_file(prefix + "model_config.yaml", yaml.safe_dump(CFG).encode()),
                                      _file(prefix + "model_weights.ckpt", _weights_bytes())], mode)
    cfg, sd = read_nemo(path)
    assert cfg == CFG and torch.equal(sd["encoder.w"], _state()["encoder.w"])


def _link(name, target, kind):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("bad,needle", [
    (_file("/etc/model_config.yaml", b"a: 1"), "absolute path"),
    (_file("../model_config.yaml", b"a: 1"), "'..'"),
    (_link("model_weights.ckpt", "/etc/passwd", tarfile.SYMTYPE), "is a link"),
    (_link("model_weights.ckpt", "model_config.yaml", tarfile.LNKTYPE), "is a link"),
])
def test_unsafe_members_are_refused_by_name(tmp_path, bad, needle):
    path = _tar(tmp_path / "evil.nemo", [_file("model_config.yaml", b"a: 1"), bad])
    with pytest.raises(NemoFileError, match=needle) as e:
        read_nemo(path)
    assert bad[0].name in str(e.value)


def test_absurd_member_size_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("nest_ssl.nemo_io.MAX_CONFIG_BYTES", 8)
    path = _tar(tmp_path / "big.nemo", [_file("model_config.yaml", b"a: 1234567890"),
                                       _file("model_weights.ckpt", _weights_bytes())])
    with pytest.raises(NemoFileError, match="over the 8-byte limit"):
        read_nemo(path)


def test_missing_member_and_garbage_file_errors_name_the_file(tmp_path):
    path = _tar(tmp_path / "half.nemo", [_file("model_config.yaml", b"a: 1")])
    with pytest.raises(NemoFileError, match="no model_weights.ckpt"):
        read_nemo(path)
    junk = tmp_path / "junk.nemo"
    junk.write_bytes(b"not a tar")
    with pytest.raises(NemoFileError, match="junk.nemo"):
        read_nemo(junk)


def test_write_refuses_non_tensor_values(tmp_path):
    with pytest.raises(NemoFileError, match="must be tensors"):
        write_nemo(tmp_path / "m.nemo", CFG, {"a": 1.0})


def test_lightning_ckpt_with_pickled_omegaconf_reads_without_omegaconf():
    # NeMo's own .ckpt (tests/fixtures/nemo_files): hyper_parameters are a pickled omegaconf DictConfig.
    path = FIXTURES / "nemo_files" / "nest_tiny_train-last.ckpt"
    with pytest.raises(pickle.UnpicklingError):  # what NeMo users hit without omegaconf
        torch.load(path, weights_only=True)
    ckpt = read_ptl_checkpoint(path)
    assert ckpt["global_step"] == 3
    assert ckpt["state_dict"]["quantizer.codebooks"].dtype == torch.float64
    assert ckpt["state_dict"]["encoder.layers.0.conv.batch_norm.num_batches_tracked"].dtype == torch.int64
    cfg, sd = export.read_checkpoint(path)
    assert cfg["optim"]["betas"] == [0.9, 0.98] and cfg["optim"]["sched"]["name"] == "NoamAnnealing"
    assert list(sd) == list(ckpt["state_dict"])


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_ckpt_with_foreign_global_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"state_dict": {}, "x": _Evil()}, protocol=2))
    with pytest.raises(NemoFileError, match="system, which is not on the allow-list"):
        read_ptl_checkpoint(path)
