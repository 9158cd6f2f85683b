"""`MultiSpeakerNoiseAugmentation`: corrupt part of each utterance with noise or other speakers.

NeMo 2.6.2 semantics, including the order of every python-`random` call, so a seeded `random.Random` reproduces
NeMo's output exactly (checked against nest_tiny/augmentation.json). Per utterance, `decide` makes every random
choice (in NeMo's order) into a plain dict, and `apply_decision` builds the scaled noise from it; the parity set's
recorded decisions go straight into `apply_decision`.

Differences from NeMo, both behind options or crashes in NeMo:
* `clean_skip=True`: a skipped utterance stays clean (noise 0, noisy length = audio length). The default (False)
  keeps NeMo's behaviour: it gets its raw, unscaled dataset noise and the noise length as its noisy length.
* When `random.choices` leaves a segment empty, NeMo raises IndexError; we place the non-empty segments.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MultiSpeakerNoiseAugmentationConfig:
    prob: float = 0.0
    noise_ratio: float = 0.0
    min_r_speech: float = -5.0
    max_r_speech: float = 5.0
    min_r_noise: float = -5.0
    max_r_noise: float = 20.0
    min_mix_rate: float = 0.0
    max_mix_rate: float = 1.0
    min_num_segments: int = 1
    max_num_segments: int = 5
    min_num_speakers: int = 1
    max_num_speakers: int = 4
    clean_skip: bool = False  # ours: skipped utterances stay clean (NeMo mixes them anyway)


def _tile(x: torch.Tensor, n: int, out_len: int) -> torch.Tensor:
    """x[:n] repeated to at least out_len samples, cut to out_len (zeros when n == 0)."""
    if n <= 0:
        return x.new_zeros(out_len)
    x = x[:n]
    if n < out_len:
        x = x.repeat(out_len // n + 1)
    return x[:out_len]


def _segment_lengths(rng, n: int, k: int) -> list[int]:
    """`Counter(rng.choices(range(n), k=k)).values()` (first-seen order), leaving rng in the same state.

    NeMo draws one python float per sample of the mixed span (tens of thousands per utterance): 90% of the
    augmentor's time. random() uses two 32-bit Mersenne-Twister words, and getrandbits(64 k) yields the next 2k
    words least-significant first, so the same floats come out of one call and numpy does the floor and count.
    """
    if type(rng) is not random.Random or k <= 0:  # subclasses may override or record choices(): literal path
        return list(Counter(rng.choices(range(n), k=k)).values())
    words = np.frombuffer(rng.getrandbits(64 * k).to_bytes(8 * k, "little"), dtype="<u4").reshape(k, 2)
    if n == 1:
        return [k]
    u = ((words[:, 0] >> 5).astype(np.float64) * 67108864.0 + (words[:, 1] >> 6)) * (1.0 / 9007199254740992.0)
    _, first, counts = np.unique(np.floor(u * float(n)).astype(np.int64), return_index=True, return_counts=True)
    return counts[np.argsort(first)].tolist()


class MultiSpeakerNoiseAugmentation:
    """Batch augmentor (not an nn.Module: it has no state and runs in the collate function, like NeMo's)."""

    config_class = MultiSpeakerNoiseAugmentationConfig

    def __init__(self, cfg: MultiSpeakerNoiseAugmentationConfig):
        checks = [(0 <= cfg.prob <= 1, "prob", cfg.prob), (0 <= cfg.noise_ratio <= 1, "noise_ratio", cfg.noise_ratio),
                  (cfg.min_r_speech <= cfg.max_r_speech, "min_r_speech/max_r_speech",
                   (cfg.min_r_speech, cfg.max_r_speech)),
                  (cfg.min_r_noise <= cfg.max_r_noise, "min_r_noise/max_r_noise", (cfg.min_r_noise, cfg.max_r_noise)),
                  (0 <= cfg.min_mix_rate <= cfg.max_mix_rate <= 1, "min_mix_rate/max_mix_rate",
                   (cfg.min_mix_rate, cfg.max_mix_rate)),
                  (1 <= cfg.min_num_segments <= cfg.max_num_segments, "min/max_num_segments",
                   (cfg.min_num_segments, cfg.max_num_segments)),
                  (1 <= cfg.min_num_speakers <= cfg.max_num_speakers, "min/max_num_speakers",
                   (cfg.min_num_speakers, cfg.max_num_speakers))]
        for ok, name, value in checks:
            if not ok:
                raise ValueError(f"{name}={value}: need 0 <= prob, noise_ratio <= 1, min <= max, mix rates in [0, 1], "
                                 "at least one segment and speaker")
        self.cfg = cfg

    # ---- random choices, in NeMo 2.6.2's call order ------------------------------------------------------
    def decide(self, i: int, audio_len: list[int], rng: random.Random) -> dict:
        cfg, B, ell = self.cfg, len(audio_len), audio_len[i]
        u = rng.random()
        if u > cfg.prob:
            return {"applied": False, "u": u}
        mix_rate = rng.uniform(cfg.min_mix_rate, cfg.max_mix_rate) if cfg.min_mix_rate < cfg.max_mix_rate \
            else cfg.min_mix_rate
        # NeMo multiplies the int64 length tensor by the rate: the product is float32.
        mix_len = max(1, int(torch.tensor(ell) * mix_rate))
        num_segments = rng.randint(cfg.min_num_segments, cfg.max_num_segments)
        num_speakers = min(rng.randint(cfg.min_num_speakers, cfg.max_num_speakers), B)
        segment_lens = _segment_lengths(rng, num_segments, mix_len)
        noise_mode = rng.random() < cfg.noise_ratio or B == 1
        lo_r, hi_r = (cfg.min_r_noise, cfg.max_r_noise) if noise_mode else (cfg.min_r_speech, cfg.max_r_speech)
        d = {"applied": True, "u": u, "mix_rate": mix_rate, "mix_len": mix_len, "num_segments": num_segments,
             "num_speakers": num_speakers, "segment_lens": segment_lens, "mode": "noise" if noise_mode else "speech",
             "energy_ratio": rng.uniform(lo_r, hi_r), "speaker_candidates": None}
        if noise_mode:
            starts = [sum(segment_lens[:j]) for j in range(len(segment_lens))]
            d["sources"] = [{"from": "noise", "start": s, "len": n} for s, n in zip(starts, segment_lens)]
        else:
            d["speaker_candidates"], d["sources"] = self._speech_sources(i, audio_len, num_speakers, segment_lens, rng)
        lo, hi, d["segment_starts"] = 0, ell - mix_len, []
        for n in segment_lens:
            start = rng.randint(lo, hi - 1) if lo < hi else lo
            d["segment_starts"].append(start)
            lo, hi = start + n, hi + n
        return d

    @staticmethod
    def _speech_sources(i, audio_len, num_speakers, segment_lens, rng):
        B = len(audio_len)
        cands = rng.sample([x for x in range(B) if x != i], k=min(num_speakers, B - 1))
        sources, sid = [], 0
        for n in segment_lens:
            bid = cands[sid]
            if n > audio_len[bid]:
                sources.append({"from": bid, "start": 0, "len": n, "repeated": True})
            else:
                start = rng.randint(0, audio_len[bid] - n - 1) if audio_len[bid] > n else 0
                sources.append({"from": bid, "start": start, "len": n, "repeated": False})
            sid += 1
            if sid >= len(cands):  # NeMo re-draws once the list is used up, after the last segment too
                sid = rng.randint(0, len(cands) - 1)
        return cands, sources

    # ---- deterministic part -------------------------------------------------------------------------------
    def apply_decision(self, i, d, audio, audio_len, noise, noise_len) -> tuple[torch.Tensor, float]:
        """The scaled noise signal (Lmax,) for utterance i from decision d, and the scale."""
        Lmax, ell = audio.shape[1], int(audio_len[i])
        sig = torch.zeros_like(audio[i])
        clip = _tile(noise[i], int(noise_len[i]), Lmax) if d["mode"] == "noise" else None
        for src, start in zip(d["sources"], d["segment_starts"]):
            n = src["len"]
            if clip is not None:
                seg = clip[src["start"]:src["start"] + n]
            elif src["repeated"]:
                seg = _tile(audio[src["from"]], int(audio_len[src["from"]]), n)
            else:
                seg = audio[src["from"], src["start"]:src["start"] + n]
            sig[start:start + n] = seg
        # float32 energies over the whole utterance (zeros included), as NeMo
        e_a = torch.sum(audio[i, :ell] ** 2) / ell
        e_n = torch.sum(sig[:ell] ** 2) / ell
        scale = math.sqrt(float(e_a / (10 ** (d["energy_ratio"] / 10) * e_n))) if float(e_n) > 0 else 0.0
        return scale * sig, scale

    def augment(self, audio, audio_len, noise, noise_len, decisions):
        """(noise, noise_len, noisy_audio, noisy_audio_len) from one decision dict per utterance."""
        noise, noise_len = noise.clone(), noise_len.clone()
        for i, d in enumerate(decisions):
            if d["applied"]:
                noise[i], _ = self.apply_decision(i, d, audio, audio_len, noise, noise_len)
                noise_len[i] = audio_len[i]
            elif self.cfg.clean_skip:
                noise[i] = 0.0
                noise_len[i] = audio_len[i]
        return noise, noise_len, audio + noise, noise_len.clone()

    def __call__(self, batch, rng: random.Random | None = None):
        """AudioNoiseBatch -> new AudioNoiseBatch (the input is not mutated). rng defaults to python's global."""
        rng = random if rng is None else rng  # the module exposes the same methods as random.Random
        if batch.audio.shape != batch.noise.shape:
            raise ValueError(f"audio shape {tuple(batch.audio.shape)} != noise shape {tuple(batch.noise.shape)}")
        lens = [int(x) for x in batch.audio_len]
        decisions = [self.decide(i, lens, rng) for i in range(len(lens))]
        noise, noise_len, noisy, noisy_len = self.augment(batch.audio, batch.audio_len, batch.noise, batch.noise_len,
                                                          decisions)
        return dataclasses.replace(batch, noise=noise, noise_len=noise_len, noisy_audio=noisy,
                                   noisy_audio_len=noisy_len)


# ---- on-device variant ----------------------------------------------------------------------------------------
def _randint(lo: torch.Tensor, hi: torch.Tensor, g, dev) -> torch.Tensor:
    """Uniform integers in [lo, hi] (inclusive, elementwise)."""
    u = torch.rand(lo.shape, generator=g, device=g.device if g is not None else dev).to(dev)
    return lo + (u * (hi - lo + 1).double()).long().clamp_max(hi - lo)


class TorchMultiSpeakerNoiseAugmentation(MultiSpeakerNoiseAugmentation):
    """Same decisions and distributions, drawn from a torch.Generator and vectorised over the batch on the batch's
    device (no per-sample Python draws; NeMo makes mix_len python draws per utterance). NOT RNG-identical to NeMo:
    use the python-`random` class for parity. Segment lengths are a multinomial split drawn by sequential binomials;
    empty segments are dropped as in NeMo."""

    def __call__(self, batch, generator: torch.Generator | None = None):
        if batch.audio.shape != batch.noise.shape:
            raise ValueError(f"audio shape {tuple(batch.audio.shape)} != noise shape {tuple(batch.noise.shape)}")
        noise, noise_len = self.augment_torch(batch.audio, batch.audio_len, batch.noise, batch.noise_len, generator)
        return dataclasses.replace(batch, noise=noise, noise_len=noise_len, noisy_audio=batch.audio + noise,
                                   noisy_audio_len=noise_len.clone())

    def _draw(self, ell: torch.Tensor, g) -> dict:
        """Per-utterance choices (B,): applied, mix_len, n_seg, n_spk, noise_mode, ratio, candidate order."""
        cfg, dev, B = self.cfg, ell.device, ell.shape[0]
        rand = lambda *s: torch.rand(s, generator=g, device=g.device if g is not None else dev).to(dev)  # noqa: E731
        full = lambda v: torch.full((B,), v, device=dev)  # noqa: E731
        applied = rand(B) <= cfg.prob
        rate = cfg.min_mix_rate + (cfg.max_mix_rate - cfg.min_mix_rate) * rand(B)
        mix_len = (ell.float() * rate.float()).long().clamp_min(1)
        n_seg = _randint(full(cfg.min_num_segments), full(cfg.max_num_segments), g, dev)
        n_spk = _randint(full(cfg.min_num_speakers), full(cfg.max_num_speakers), g, dev).clamp_max(max(B - 1, 1))
        noise_mode = (rand(B) < cfg.noise_ratio) | (B == 1)
        lo_r = torch.where(noise_mode, cfg.min_r_noise, cfg.min_r_speech)
        hi_r = torch.where(noise_mode, cfg.max_r_noise, cfg.max_r_speech)
        ratio = lo_r + (hi_r - lo_r) * rand(B).double()
        # speaker candidates: the other utterances in random order; the first n_spk are the sampled speakers
        keys = rand(B, B).masked_fill(torch.eye(B, dtype=torch.bool, device=dev), 2.0)
        return {"applied": applied, "mix_len": mix_len, "n_seg": n_seg, "n_spk": n_spk, "noise_mode": noise_mode,
                "ratio": ratio, "cands": keys.argsort(dim=1)}

    def augment_torch(self, audio, audio_len, noise, noise_len, g=None):
        cfg, dev = self.cfg, audio.device
        B, Lmax = audio.shape
        ell, nlen = audio_len.long().to(dev), noise_len.long().to(dev)
        d = self._draw(ell, g)
        applied, mix_len, n_seg, n_spk = d["applied"], d["mix_len"], d["n_seg"], d["n_spk"]
        noise_mode, ratio, cands = d["noise_mode"], d["ratio"], d["cands"]
        sig = torch.zeros_like(audio)
        t = torch.arange(Lmax, device=dev).expand(B, Lmax)
        remaining, lo, hi = mix_len.clone(), torch.zeros_like(ell), ell - mix_len
        consumed, sid = torch.zeros_like(ell), torch.zeros_like(ell)
        for j in range(cfg.max_num_segments):
            left = (n_seg - j).clamp_min(1)
            p = torch.where(n_seg - j > 1, 1.0 / left.double(), 1.0)
            seg = torch.binomial(remaining.double(), p, generator=g).long() if g is None or g.device == dev \
                else torch.binomial(remaining.double().cpu(), p.cpu(), generator=g).long().to(dev)
            seg = torch.where(j < n_seg, seg, 0)
            remaining = remaining - seg
            start = torch.where(lo < hi, _randint(lo, (hi - 1).clamp_min(lo), g, dev), lo)
            bid = cands.gather(1, sid[:, None]).squeeze(1)
            blen = ell[bid].clamp_min(1)
            sp_hi = (blen - seg - 1).clamp_min(0)
            sp_start = torch.where(blen > seg, _randint(torch.zeros_like(seg), sp_hi, g, dev), 0)
            k = t - start[:, None]  # offset inside this segment
            inside = (k >= 0) & (k < seg[:, None]) & (seg[:, None] > 0)
            src_noise = noise.gather(1, ((consumed[:, None] + k).clamp_min(0) % nlen.clamp_min(1)[:, None]))
            src_speech = audio[bid].gather(1, ((sp_start[:, None] + k).clamp_min(0) % blen[:, None]))
            src = torch.where(noise_mode[:, None], src_noise * (nlen > 0)[:, None], src_speech)
            sig = torch.where(inside, src, sig)
            used = seg > 0
            consumed = consumed + seg
            lo, hi = torch.where(used, start + seg, lo), torch.where(used, hi + seg, hi)
            sid = torch.where(used & ~noise_mode, sid + 1, sid)
            sid = torch.where(sid >= n_spk, _randint(torch.zeros_like(sid), n_spk - 1, g, dev), sid)
        valid = t < ell[:, None]
        e_a = (audio.square() * valid).sum(1) / ell.clamp_min(1)
        e_n = (sig.square() * valid).sum(1) / ell.clamp_min(1)
        scale = torch.where(e_n > 0, (e_a / ((10 ** (ratio / 10)).float() * e_n)).sqrt(), 0.0)
        out = torch.where(applied[:, None], scale[:, None] * sig, noise)
        out_len = torch.where(applied, ell, nlen)
        if cfg.clean_skip:
            out = torch.where(applied[:, None], out, 0.0)
            out_len = ell.clone()
        return out, out_len.to(noise_len.dtype)
