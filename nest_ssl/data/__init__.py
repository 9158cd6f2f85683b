"""Data pipeline: manifests, audio + noise datasets (plain and tarred), samplers, augmentation and the loaders."""
from nest_ssl.data.batch import AudioNoiseBatch, AudioNoiseItem
from nest_ssl.data.config import DatasetConfig
from nest_ssl.data.loader import build_dataloader, build_loader

__all__ = ["AudioNoiseBatch", "AudioNoiseItem", "DatasetConfig", "build_dataloader", "build_loader"]
