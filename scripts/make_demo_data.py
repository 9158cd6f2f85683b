"""Write a tiny synthetic speech-like corpus + noise + NeMo manifests (no downloads), for the demo and tests.

Each "utterance" is a chain of voiced syllables: harmonics of a gliding pitch (source), shaped by a few
moving formant resonators (vocal tract), with breathy noise and short pauses between syllables. Noise files
are coloured noise and hum. Deterministic for a given --seed.

    python scripts/make_demo_data.py --out demo_data [--num-files 100] [--num-noise 10] [--seed 0]

writes  demo_data/{train,val}/*.wav, demo_data/noise/*.wav and train_manifest.json, val_manifest.json,
noise_manifest.json (one JSON object per line: audio_filepath, duration, text).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nest_ssl import cli  # noqa: E402

SR = 16000
VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (640, 1190, 2390)]


def resonator(x: np.ndarray, freq: float, bw: float) -> np.ndarray:
    """Two-pole band-pass (one formant): y[n] = x[n] + a1 y[n-1] + a2 y[n-2]."""
    r = np.exp(-np.pi * bw / SR)
    a = torch.tensor([1.0, -2 * r * np.cos(2 * np.pi * freq / SR), r * r], dtype=torch.float64)
    b = torch.tensor([1.0 - r, 0.0, 0.0], dtype=torch.float64)
    return torchaudio.functional.lfilter(torch.from_numpy(x), a, b, clamp=False).numpy()


def syllable(rng: np.random.Generator, dur: float) -> np.ndarray:
    n = int(dur * SR)
    t = np.arange(n) / SR
    f0 = rng.uniform(90, 220) * (1 + rng.uniform(-0.25, 0.25) * t / dur)  # gliding pitch
    phase = 2 * np.pi * np.cumsum(f0) / SR
    src = sum(np.sin(k * phase) / k for k in range(1, 25) if k * f0.max() < SR / 2)
    src = src + 0.05 * rng.standard_normal(n)  # breath noise
    formants = VOWELS[rng.integers(len(VOWELS))]
    y = sum(resonator(src, f * rng.uniform(0.9, 1.1), 80 + 40 * i) for i, f in enumerate(formants))
    env = np.sin(np.pi * np.clip(t / dur, 0, 1)) ** 0.6
    return y * env


def utterance(rng: np.random.Generator) -> np.ndarray:
    target, parts = rng.uniform(1.0, 4.0), []
    while sum(len(p) for p in parts) < target * SR:
        parts.append(syllable(rng, rng.uniform(0.12, 0.35)))
        parts.append(0.003 * rng.standard_normal(int(rng.uniform(0.02, 0.15) * SR)))  # pause
    x = np.concatenate(parts)[: int(target * SR)]
    return (0.5 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def noise(rng: np.random.Generator) -> np.ndarray:
    n = int(rng.uniform(2.0, 5.0) * SR)
    white = rng.standard_normal(n)
    colour = np.cumsum(white) * 0.02 if rng.random() < 0.5 else white  # brown-ish or white
    colour = colour - np.convolve(colour, np.ones(400) / 400, mode="same")
    hum = 0.3 * np.sin(2 * np.pi * rng.choice([50, 60]) * np.arange(n) / SR)
    x = colour / (np.abs(colour).max() + 1e-9) + hum * rng.random()
    return (0.3 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def write_set(out: Path, sub: str, make: Callable[[], np.ndarray], count: int, t0: float) -> Path:
    """`count` signals from make() as wavs + manifest, with a progress line every 25 files (the whole build takes
    ~30 s of CPU: it must not look hung)."""
    (out / sub).mkdir(parents=True, exist_ok=True)
    manifest = out / f"{sub}_manifest.json"
    with open(manifest, "w") as f:
        for i in range(count):
            x, path = make(), out / sub / f"{sub}_{i:04d}.wav"
            sf.write(path, x, SR, subtype="PCM_16")
            f.write(json.dumps({"audio_filepath": str(path.resolve()), "duration": len(x) / SR, "text": ""}) + "\n")
            if (i + 1) % 25 == 0 or i + 1 == count:
                print(f"make_demo_data: {sub} {i + 1}/{count} files, {time.time() - t0:.0f} s", flush=True)
    return manifest


def main(argv=None) -> int:
    ap = cli.Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="demo_data")
    ap.add_argument("--num-files", type=int, default=100)
    ap.add_argument("--num-val", type=int, default=12)
    ap.add_argument("--num-noise", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.num_files < 1 or a.num_val < 1 or a.num_noise < 0:
        ap.error(f"--num-files={a.num_files}, --num-val={a.num_val} must be >= 1, --num-noise={a.num_noise} >= 0")
    return cli.run(lambda: build(a), a.debug)


def build(a) -> int:
    rng, out, t0 = np.random.default_rng(a.seed), Path(a.out), time.time()
    write_set(out, "train", lambda: utterance(rng), a.num_files, t0)  # one rng, drawn in this order: same corpus
    write_set(out, "val", lambda: utterance(rng), a.num_val, t0)
    write_set(out, "noise", lambda: noise(rng), a.num_noise, t0)
    print(f"wrote {a.num_files} train, {a.num_val} val and {a.num_noise} noise files + manifests under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
