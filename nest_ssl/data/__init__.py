"""Data pipeline: manifests, audio + noise datasets (plain and tarred), samplers, and `build_dataloader`."""
from nest_ssl.data.batch import AudioNoiseBatch, AudioNoiseItem
from nest_ssl.data.config import DatasetConfig

__all__ = ["AudioNoiseBatch", "AudioNoiseItem", "DatasetConfig", "build_dataloader"]


def build_dataloader(*args, **kwargs):
    """Lazy re-export of nest_ssl.data.loader.build_dataloader (keeps `import nest_ssl.data` light)."""
    from nest_ssl.data.loader import build_dataloader as build
    return build(*args, **kwargs)
