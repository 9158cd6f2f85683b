"""Per-utterance encoder features for downstream tasks (what NeMo's `scripts/ssl/extract_features.py` gives).

Audio from a NeMo manifest -> preprocessor -> encoder, in padded batches on the model's device, with forward hooks on
`encoder.layers[i]` (their output is (B, T', d)) and the encoder output itself ("final", (B, d, T') transposed).
Each utterance's valid frames, (T', d) float32, are written as `<out>/<stem>.npz` (keys `layer_<i>`, `final`) or as
`<out>/<layer>/<stem>.npy`, and an output manifest repeats each input line with the feature path(s) added. The
manifest is written when every utterance has been tried (a temp file renamed), so it never looks complete while the
run is not; an utterance whose audio cannot be read is left out of it and listed in `features_failed.json`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nest_ssl.data.audio import AudioLoader, BadSample
from nest_ssl.data.manifest import read_manifests

FEATURE_FORMATS = ("npz", "npy")
MANIFEST, FAILED = "features_manifest.json", "features_failed.json"


def parse_layers(spec, n_layers: int) -> list:
    """"0,5,-1" / [0, "final"] -> [0, 5, "final"]: -1 and "final" mean the encoder output; i in [0, n_layers)."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if str(item).lower() in ("final", "-1"):
            key = "final"
        else:
            try:
                key = int(item)
            except ValueError:
                raise ValueError(f"layers: {item!r} is not an integer or 'final'") from None
            if not 0 <= key < n_layers:
                raise ValueError(f"layers: {key} is out of range; allowed: 0..{n_layers - 1}, -1 or 'final'")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError(f"layers={spec!r}: give at least one layer")
    return out


def layer_name(key) -> str:
    return "final" if key == "final" else f"layer_{key}"


def read_manifest(path: str | Path) -> list[dict]:
    """Manifest lines as dicts (the data package's reader resolves relative audio paths against the manifest)."""
    entries = read_manifests(str(path))
    return [{"audio_filepath": e.audio_filepath, "duration": e.duration, "offset": e.offset} for e in entries]


def _stems(entries: list[dict]) -> list[str]:
    """File stems, made unique (same name in two folders) with the line index."""
    seen, out = set(), []
    for i, e in enumerate(entries):
        stem = Path(e["audio_filepath"]).stem
        if stem in seen:
            stem = f"{stem}_{i}"
        seen.add(stem)
        out.append(stem)
    return out


@torch.no_grad()
def encode_batch(model: nn.Module, audio: torch.Tensor, lengths: torch.Tensor, layers: list) -> dict:
    """{key: (B, T', d) tensor} for the requested layers, plus "_len" (B,) valid frame counts."""
    captured, handles = {}, []
    for key in layers:
        if key != "final":
            hook = (lambda k: lambda mod, args, out: captured.__setitem__(k, out[0] if isinstance(out, tuple) else out))
            handles.append(model.encoder.layers[key].register_forward_hook(hook(key)))
    try:
        feats, feat_len = model.preprocessor(audio, lengths)  # (B, F, T)
        encoded, encoded_len = model.encoder(feats, feat_len)  # (B, d, T')
    finally:
        for h in handles:
            h.remove()
    if "final" in layers:
        captured["final"] = encoded.transpose(1, 2)  # (B, T', d)
    captured["_len"] = encoded_len
    return captured


def _write(out_dir: Path, stem: str, feats: dict, fmt: str) -> dict:
    if fmt == "npz":
        path = out_dir / f"{stem}.npz"
        np.savez(path, **{layer_name(k): v for k, v in feats.items()})
        return {"feature_filepath": str(path)}
    paths = {}
    for k, v in feats.items():
        path = out_dir / layer_name(k) / f"{stem}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, v)
        paths[f"feature_filepath_{layer_name(k)}"] = str(path)
    return paths


def _write_lines(path: Path, rows: list[dict]) -> None:
    """JSON lines to `path` through a temp file and a rename: a reader sees the whole list or the previous file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _load_all(loader: AudioLoader, chunk: list[dict], failed: list[dict]) -> tuple[list[int], list]:
    """Indices into `chunk` of its readable entries, and their audio; each unreadable entry goes to `failed` with its
    kind and reason."""
    good, wavs = [], []
    for i, e in enumerate(chunk):
        try:
            wavs.append(loader.load(e["audio_filepath"], e["offset"], e["duration"]))
            good.append(i)
        except BadSample as err:
            failed.append({**e, "kind": err.kind, "reason": err.reason})
    return good, wavs


def extract_features(model: nn.Module, manifest: str | Path, out_dir: str | Path, layers="-1", batch_size: int = 8,
                     fmt: str = "npz", device: str | torch.device | None = None,
                     progress: bool = True) -> tuple[Path, list[dict]]:
    """Write features for every readable manifest entry. Returns the output manifest
    (`<out_dir>/features_manifest.json`) and the entries that failed (each with `kind` and `reason`; also in
    `<out_dir>/features_failed.json`, removed when none)."""
    if fmt not in FEATURE_FORMATS:
        raise ValueError(f"fmt={fmt!r}; allowed: {list(FEATURE_FORMATS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; must be >= 1")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    keys = parse_layers(layers, len(model.encoder.layers))
    entries, out_dir = read_manifest(manifest), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems, loader = _stems(entries), AudioLoader(int(model.preprocessor.cfg.sample_rate))
    rows, failed, t0 = [], [], time.time()
    try:
        for start in range(0, len(entries), batch_size):
            chunk, failed_before = entries[start:start + batch_size], len(failed)
            good, wavs = _load_all(loader, chunk, failed)
            if good:
                lengths = torch.tensor([len(w) for w in wavs], dtype=torch.int64)
                audio = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)  # (B, L), zero-padded
                out = encode_batch(model, audio.to(device), lengths.to(device), keys)
                lens = out.pop("_len").cpu()
                for b, i in enumerate(good):
                    feats = {k: out[k][b, : int(lens[b])].float().cpu().numpy() for k in keys}  # (T', d)
                    rows.append({**chunk[i], **_write(out_dir, stems[start + i], feats, fmt)})
            if progress:
                done = min(start + batch_size, len(entries))
                print(f"\rextract_features: {done}/{len(entries)} utterances, {len(failed)} failed, "
                      f"{time.time() - t0:.1f} s", end="" if done < len(entries) and len(failed) == failed_before
                      else "\n", file=sys.stderr, flush=True)  # a line with a new failure stays on screen
    finally:
        if progress and entries and start + batch_size < len(entries):
            print(file=sys.stderr)  # stopped mid-run: the error that follows starts on its own line
    _write_lines(out_dir / MANIFEST, rows)
    if failed:
        _write_lines(out_dir / FAILED, failed)
    else:
        (out_dir / FAILED).unlink(missing_ok=True)  # a previous run's list no longer applies
    return out_dir / MANIFEST, failed
