"""A small synthetic labelled corpus with learnable structure, for the frozen-encoder probe's demo and tests.

Each character is a distinct sound in the style of the demo corpus (scripts/make_demo_data.py): the vowels a e i o u
are voiced harmonics shaped by that vowel's three formants, `m` a low nasal murmur, `s` a high hiss, `k` a broadband
burst; a space is a short pause. Characters last 0.16-0.32 s (2-4 encoder frames at 80 ms), so speed varies, and an
utterance holds 2-3 words of 2-4 characters. Each utterance has one of three "speakers" (its `label`: low / mid /
high pitch with a matching vocal-tract scale) and noise (coloured noise + mains hum, as the demo's noise files) mixed
at 5-20 dB SNR. Deterministic for a seed. Manifests are NeMo's JSON lines with `text` and `label`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

SR = 16000
ALPHABET = "aeioumsk"
LABELS = [" "] + list(ALPHABET)  # CTC character set of the corpus (the blank is added by the probe)
FORMANTS = {"a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (270, 2290, 3010), "o": (570, 840, 2410),
            "u": (300, 870, 2240), "m": (250, 1100, 2200)}
SPEAKERS = {"low": ((90, 120), 0.9), "mid": ((140, 170), 1.0), "high": ((200, 240), 1.12)}


def _resonator(x: np.ndarray, freq: float, bw: float) -> np.ndarray:
    r = np.exp(-np.pi * bw / SR)
    a = torch.tensor([1.0, -2 * r * np.cos(2 * np.pi * freq / SR), r * r], dtype=torch.float64)
    b = torch.tensor([1.0 - r, 0.0, 0.0], dtype=torch.float64)
    return torchaudio.functional.lfilter(torch.from_numpy(x), a, b, clamp=False).numpy()


def render_char(ch: str, rng: np.random.Generator, speaker: str) -> np.ndarray:
    (lo, hi), scale = SPEAKERS[speaker]
    n = int(rng.uniform(0.16, 0.32) * SR)
    t = np.arange(n) / SR
    env = np.sin(np.pi * np.clip(t / t[-1], 0, 1)) ** 0.5
    if ch in FORMANTS:
        f0 = rng.uniform(lo, hi) * (1 + rng.uniform(-0.1, 0.1) * t / t[-1])
        phase = 2 * np.pi * np.cumsum(f0) / SR
        src = sum(np.sin(k * phase) / k for k in range(1, 30) if k * f0.max() < SR / 2) + 0.03 * rng.standard_normal(n)
        formants = FORMANTS[ch] if ch != "m" else (250, 0, 0)
        y = sum(_resonator(src, f * scale, 80 + 40 * i) for i, f in enumerate(formants) if f)
    elif ch == "s":
        y = _resonator(rng.standard_normal(n), 5500 * scale, 1500) - _resonator(rng.standard_normal(n), 300, 200)
    else:  # "k": a burst then a fading low rumble
        y = rng.standard_normal(n) * np.exp(-t / 0.02) + 0.3 * _resonator(rng.standard_normal(n), 1500 * scale, 600)
    return y / (np.abs(y).max() + 1e-9) * env


def noise(n: int, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    colour = np.cumsum(white) * 0.02 if rng.random() < 0.5 else white
    colour = colour - np.convolve(colour, np.ones(400) / 400, mode="same")
    hum = 0.3 * np.sin(2 * np.pi * rng.choice([50, 60]) * np.arange(n) / SR)
    return colour / (np.abs(colour).max() + 1e-9) + hum * rng.random()


def utterance(rng: np.random.Generator) -> tuple[np.ndarray, str, str]:
    speaker = str(rng.choice(list(SPEAKERS)))
    words = ["".join(rng.choice(list(ALPHABET), size=rng.integers(2, 5))) for _ in range(rng.integers(2, 4))]
    text, parts = " ".join(words), [np.zeros(int(0.05 * SR))]
    for ch in text:
        parts.append(np.zeros(int(rng.uniform(0.12, 0.25) * SR)) if ch == " " else render_char(ch, rng, speaker))
    parts.append(np.zeros(int(0.05 * SR)))
    x = np.concatenate(parts)
    nz = noise(len(x), rng)
    snr_db = rng.uniform(5, 20)
    x = x + nz * np.sqrt((x**2).mean() / ((nz**2).mean() * 10 ** (snr_db / 10)))
    return (0.5 * x / (np.abs(x).max() + 1e-9)).astype(np.float32), text, speaker


def write_probe_corpus(out: str | Path, num_train: int = 64, num_eval: int = 24, seed: int = 0) -> dict:
    """-> {"train": manifest path, "eval": manifest path, "labels": CTC characters, "classes": speaker labels}."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    paths = {}
    for split, count in (("train", num_train), ("eval", num_eval)):
        (out / split).mkdir(parents=True, exist_ok=True)
        paths[split] = out / f"{split}_manifest.json"
        with open(paths[split], "w") as f:
            for i in range(count):
                x, text, speaker = utterance(rng)
                wav = out / split / f"{split}_{i:04d}.wav"
                sf.write(wav, x, SR, subtype="PCM_16")
                f.write(json.dumps({"audio_filepath": str(wav.resolve()), "duration": len(x) / SR, "text": text,
                                    "label": speaker}) + "\n")
    return {"train": str(paths["train"]), "eval": str(paths["eval"]), "labels": LABELS, "classes": list(SPEAKERS)}
