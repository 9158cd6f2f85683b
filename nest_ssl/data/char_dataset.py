"""Labelled audio for fine-tuning and probing (not used by NEST pretraining): NeMo's `AudioToCharDataset` (audio +
character ids of `text`), its tarred form `TarredAudioToCharDataset` (NeMo's shards + tarred manifest), and
`AudioToLabelDataset` (audio + the id of the manifest's `label`, one class per utterance).

Text is lower-cased (NeMo's "en" parser also normalises numbers/punctuation; we only drop characters that are not
in `labels`). Items: (audio (L,), audio_len, tokens (U,), tokens_len); the collate zero-pads audio and pads
tokens with `pad_id` (NeMo's default 0).
"""
from __future__ import annotations

import torch

from nest_ssl.data.audio import AudioLoader, BadSample
from nest_ssl.data.dataset import BadItem
from nest_ssl.data.manifest import ManifestEntry
from nest_ssl.data.tarred import TarredAudioNoiseDataset


class AudioToCharDataset(torch.utils.data.Dataset):
    def __init__(self, entries: list[ManifestEntry], labels: list[str], sample_rate: int, channel_selector=None,
                 skip_bad: bool = True):
        if not labels:
            raise ValueError(f"labels={labels!r}: {type(self).__name__} needs a non-empty label list")
        self.entries, self.skip_bad = entries, skip_bad
        self.by_line = {e.line: e for e in entries}  # the tarred reader hands items over by manifest line
        self.char_to_id = {c: i for i, c in enumerate(labels)}
        self.loader = AudioLoader(sample_rate, channel_selector)

    def __len__(self) -> int:
        return len(self.entries)

    def tokenize(self, text: str) -> list[int]:
        return [self.char_to_id[c] for c in text.lower() if c in self.char_to_id]

    def targets(self, e: ManifestEntry) -> list[int]:
        return self.tokenize(e.text)

    def make_item(self, line: int, audio: torch.Tensor):
        tokens = torch.tensor(self.targets(self.by_line[line]), dtype=torch.long)
        return audio, audio.shape[0], tokens, tokens.shape[0]

    def __getitem__(self, index: int):
        e = self.entries[index]
        try:
            return self.make_item(e.line, self.loader.load(e.audio_filepath, e.offset, e.duration))
        except BadSample as err:
            if not self.skip_bad:
                raise ValueError(f"bad sample {err.path}: {err.reason} (skip_bad_samples=false)") from None
            return BadItem(err.path, err.reason)


class AudioToLabelDataset(AudioToCharDataset):
    """One class per utterance from the manifest's `label` field; items carry it as a length-1 target."""

    def targets(self, e: ManifestEntry) -> list[int]:
        if e.label not in self.char_to_id:
            raise ValueError(f"{e.audio_filepath}: label {e.label!r} is not one of {sorted(self.char_to_id)}")
        return [self.char_to_id[e.label]]


class TarredAudioToCharDataset(TarredAudioNoiseDataset):
    """NeMo's tarred char dataset: shards (brace syntax, `pipe:` sources) + the tarred manifest, streamed as
    TarredAudioNoiseDataset does (per-rank/per-worker shards, `shuffle_n` buffer), items as AudioToCharDataset's."""

    def __init__(self, entries: list[ManifestEntry], shards: list[str], labels: list[str], sample_rate: int,
                 shuffle_n: int = 0, seed: int = 0, skip_bad: bool = True):
        super().__init__(AudioToCharDataset(entries, labels, sample_rate, skip_bad=skip_bad), shards, shuffle_n, seed)


def char_collate(items, pad_id: int = 0):
    """-> (audio (B, Lmax), audio_len (B,), tokens (B, Umax), tokens_len (B,)); BadItems are dropped."""
    items = [x for x in items if not isinstance(x, BadItem)]
    if not items:
        return None
    a_len = torch.tensor([x[1] for x in items], dtype=torch.long)
    t_len = torch.tensor([x[3] for x in items], dtype=torch.long)
    audio = torch.zeros(len(items), int(a_len.max()))
    tokens = torch.full((len(items), max(int(t_len.max()), 1)), pad_id, dtype=torch.long)
    for i, (a, n, t, u) in enumerate(items):
        audio[i, :n] = a
        tokens[i, :u] = t
    return audio, a_len, tokens, t_len
