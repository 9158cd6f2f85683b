"""Model FLOPs of a NEST training step, for model FLOP utilisation (MFU).

Convention (PaLM's, the usual one for MFU): per encoder frame ("token"), forward + backward costs
6 * N + 12 * n_layers * d_model * T', where N is the number of trainable parameters (each used once per frame,
multiply-add = 2 FLOPs, backward = 2x forward) and the second term is the attention score and value products over T'
frames. Not counted: the frozen quantizer, the preprocessor, and recomputation. Encoder frames per audio-second are
100 / subsampling_factor. NEST-L (112,964,608 trainable parameters) at 20 s utterances: 8.8 GFLOP per audio-second.
"""
from __future__ import annotations


def nest_train_flops_per_audio_second(trainable_params: int, encoder_cfg: dict, seconds: float) -> float:
    d, n_layers = int(encoder_cfg["d_model"]), int(encoder_cfg["n_layers"])
    frames_per_second = 100 / int(encoder_cfg.get("subsampling_factor", 8))
    t = -(-int(round(seconds * 100)) // int(encoder_cfg.get("subsampling_factor", 8)))  # T' of one utterance
    return frames_per_second * (6 * trainable_params + 12 * n_layers * d * t)


def mfu(audio_seconds_per_second: float, flops_per_audio_second: float, peak_flops: float) -> float:
    """Fraction of the accelerator's peak (e.g. 989e12 for H100 SXM dense bf16) the step achieves."""
    return audio_seconds_per_second * flops_per_audio_second / peak_flops
