"""No host syncs in the NEST training step (issue: end-to-end speed).

On a GPU, reading a device value on the host (`.item()`, `float(t)`, `bool(t)`, `if t.any()`) or boolean-mask
indexing (`x[mask]`, whose output size needs a nonzero count) makes the CPU wait for the GPU, so the launch queue
drains every time. These ops reach the dispatcher as `_local_scalar_dense` or `nonzero` / bool-indexed `index`
on every device, so a dispatch mode on the CPU finds them without a GPU.
"""
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import PARITY
from nest_ssl.data.augmentation import MultiSpeakerNoiseAugmentationConfig, TorchMultiSpeakerNoiseAugmentation
from nest_ssl.data.batch import AudioNoiseBatch
from nest_ssl.nest.model import EncDecDenoiseMaskedTokenPredModel

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.is_nonzero.default, aten.equal.default}


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found, self.device_asserts = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if func in SYNC_OPS or bool_index:
            self.found.append(str(func))
        if func is aten._assert_async.msg:
            self.device_asserts += 1
        return func(*args, **kwargs)


def _batch(B=3, L=16000):
    torch.manual_seed(0)
    lens = torch.tensor([L, L - 3000, L // 2])
    audio = torch.randn(B, L) * (torch.arange(L) < lens[:, None])
    noise = torch.randn(B, L) * 0.1
    return AudioNoiseBatch(audio=audio, audio_len=lens, noise=noise, noise_len=lens.clone())


def test_detector_sees_a_sync():
    with HostSyncs() as mode:
        x = torch.randn(4)
        _ = float(x.sum()), x[x > 0]
    assert len(mode.found) == 2  # the detector can fail


def test_training_step_forward_backward_has_no_host_sync(monkeypatch):
    monkeypatch.setattr("nest_ssl.checks.HOST_CHECKED", ())  # length checks as on a GPU: queued, not read
    cfg = json.loads((PARITY / "nest_tiny" / "config.json").read_text())["model"]
    model = EncDecDenoiseMaskedTokenPredModel(cfg)
    model.train()
    aug = TorchMultiSpeakerNoiseAugmentation(MultiSpeakerNoiseAugmentationConfig(prob=1.0, noise_ratio=0.5,
                                                                                 max_num_segments=3))
    gen = torch.Generator().manual_seed(0)
    batch = _batch()
    with HostSyncs() as mode:
        batch = aug(batch, gen)  # the augment_on_device path
        out = model.training_step(batch, generator=gen)
        out["loss"].backward()
    assert mode.found == []
    assert mode.device_asserts == 3  # the length checks still run: preprocessor x2, encoder
    assert int(out["masked_tokens"]) > 0 and torch.isfinite(out["loss"])  # a real step, outside the mode
