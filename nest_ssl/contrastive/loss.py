"""`ContrastiveLoss`: wav2vec-2.0 InfoNCE over masked target steps.

Targets are k stacked log-mel frames per encoder step, quantized by a Gumbel quantizer (or projected by
`target_proj` when `quantized_targets` is false). Each masked step is scored against its own target and N negatives
drawn from the masked steps of the same utterance, by cosine similarity / logit_temp; negatives equal to the positive
are set to -inf. loss = (sum CE + prob_ppl_weight * prob_ppl * M) * multiplier / B, with M masked steps.

Where NeMo crashes or silently misaligns (unequal masked counts per utterance, too few masked steps for the
negatives, group_loss), we raise a ValueError that says why and what to change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import GumbelVectorQuantizer


@dataclass
class ContrastiveLossConfig:
    in_dim: int = 80
    proj_dim: int = 128
    combine_time_steps: int = 1
    num_negatives: int = 100
    quantized_targets: bool = False
    codebook_size: int = 320
    prob_ppl_weight: float = 0.1
    logit_temp: float = 0.1
    reduce: str = "sum"
    sample_from_same_utterance_only: bool = True
    sample_from_non_masked: bool = False
    sample_from_codebook: bool = False
    group_loss: bool = False
    num_groups: int = 2
    quantizer_temp_start: float = 2.0
    quantizer_temp_min: float = 0.5
    quantizer_temp_decay: float = 0.999995
    mask_threshold: float = 0.8
    store_ids: bool = True
    reduce_ids: bool = False
    multiplier: float = 16.0


class ContrastiveLoss(nn.Module):
    config_class = ContrastiveLossConfig
    needs_labels = False

    def __init__(self, cfg: ContrastiveLossConfig):
        super().__init__()
        if cfg.group_loss:
            raise ValueError("ContrastiveLoss.group_loss=true is not supported (NeMo crashes on it: its quantizer "
                             "shares one codebook across groups); set group_loss: false")
        if cfg.sample_from_codebook or cfg.reduce_ids:
            raise ValueError("ContrastiveLoss: sample_from_codebook and reduce_ids are not supported; set them false")
        if cfg.reduce not in ("sum", "mean", "none"):
            raise ValueError(f"ContrastiveLoss.reduce={cfg.reduce!r}; allowed: ['sum', 'mean', 'none']")
        self.cfg = cfg
        dim = cfg.in_dim * cfg.combine_time_steps
        if cfg.quantized_targets:
            temps = (cfg.quantizer_temp_start, cfg.quantizer_temp_min, cfg.quantizer_temp_decay)
            self.quantizer = GumbelVectorQuantizer(dim, cfg.codebook_size, temps, cfg.num_groups, cfg.proj_dim)
        else:
            self.target_proj = nn.Linear(dim, cfg.proj_dim)
        self.target_ids, self.target_lengths = None, None  # read by an MLM loss with targets_from_loss

    def set_num_updates(self, num_updates: int) -> None:
        if self.cfg.quantized_targets:
            self.quantizer.set_num_updates(num_updates)

    def forward(self, spectrograms, spec_masks, decoder_outputs, decoder_lengths=None, *, neg_idxs=None,
                gumbel_noise=None):
        """spectrograms, spec_masks (B, D, T); decoder_outputs (B, T', C). `neg_idxs` / `gumbel_noise` replace the
        random draws (parity tests inject NeMo's). Returns the scalar loss; `self.last` holds the intermediates."""
        B, T2 = decoder_outputs.shape[:2]
        targets, masks = self._stack(spectrograms, T2), self._stack(spec_masks, T2)  # (B, T', k*D)
        prob_ppl = None
        if self.cfg.quantized_targets:
            q, prob_ppl, ids = self.quantizer(targets, gumbel_noise=gumbel_noise)
            self.target_ids = ids if self.cfg.store_ids else None
        else:
            q = self.target_proj(targets)
        tok = masks.mean(-1) > self.cfg.mask_threshold  # (B, T') masked target steps
        if self.cfg.sample_from_same_utterance_only:
            out, tgt, negs, neg_idxs = self._same_utterance(decoder_outputs, q, tok, neg_idxs)
        else:
            out, tgt, negs, neg_idxs = self._whole_batch(decoder_outputs, q, tok, neg_idxs)
        logits, neg_is_pos = self._similarity(out, tgt, negs)
        target = torch.zeros(logits.shape[1], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits.transpose(0, 1), target, reduction=self.cfg.reduce)  # (M, 1+N), positive at 0
        if prob_ppl is not None and self.cfg.prob_ppl_weight != 0:
            loss = loss + self.cfg.prob_ppl_weight * prob_ppl * out.shape[0]
        loss = loss * self.cfg.multiplier / B
        self.last = {"similarity": logits, "neg_is_pos": neg_is_pos, "neg_idxs": neg_idxs, "token_mask": tok,
                     "quantized": q, "prob_ppl": prob_ppl}
        return loss

    @staticmethod
    def _stack(x: torch.Tensor, steps: int) -> torch.Tensor:
        x = x.transpose(1, 2)  # (B, T, D)
        B, T, D = x.shape
        if T % steps:  # NeMo zero-pads T up to a multiple of the decoder length (no-op with pad_to 16)
            x = F.pad(x, (0, 0, 0, steps - T % steps))
        return x.reshape(B, steps, -1)  # (B, T', T/T' * D), frame-major within a step

    def _draw(self, rows: int, pool: int, neg_idxs):
        n = self.cfg.num_negatives
        if neg_idxs is not None:
            return neg_idxs.to(torch.long)
        if pool < n:
            raise ValueError(
                f"ContrastiveLoss: only {pool} candidate steps per utterance for num_negatives={n} drawn without "
                "replacement; use longer utterances (raise min_duration), more/larger mask patches, or fewer "
                "negatives")
        return torch.multinomial(torch.ones(rows, pool, device="cpu"), n).to(self._device)

    def _same_utterance(self, dec, q, tok, neg_idxs):
        B, T2, C = dec.shape
        counts = tok.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(f"ContrastiveLoss: masked steps per utterance differ ({counts.tolist()}); "
                             "sample_from_same_utterance_only needs the same count in every utterance (NeMo would "
                             "silently mix utterances). Use MaskedPatchAugmentation without time masks")
        m = int(counts[0])
        self._device = dec.device
        out = dec[tok].reshape(B, m, C).transpose(0, 1)  # (T'_m, B, C)
        tgt = q[tok].reshape(B, m, -1).transpose(0, 1)
        if self.cfg.sample_from_non_masked:
            neg_idxs = self._draw(m, T2, neg_idxs)
            pool = q.transpose(0, 1)  # (T', B, C): every step of the utterance
        else:
            neg_idxs = self._draw(m, m, neg_idxs)
            pool = tgt
        negs = pool[neg_idxs.flatten()].view(m, -1, B, pool.shape[-1]).transpose(0, 1)  # (N, T'_m, B, C)
        return out.reshape(m * B, C), tgt.reshape(m * B, -1), negs.reshape(negs.shape[0], m * B, -1), neg_idxs

    def _whole_batch(self, dec, q, tok, neg_idxs):
        self._device = dec.device
        out, tgt = dec[tok], q[tok]  # (M, C)
        pool = q.reshape(-1, q.shape[-1]) if self.cfg.sample_from_non_masked else tgt
        neg_idxs = self._draw(out.shape[0], pool.shape[0], neg_idxs)
        negs = pool[neg_idxs.flatten()].view(out.shape[0], -1, pool.shape[-1]).transpose(0, 1)  # (N, M, C)
        return out, tgt, negs, neg_idxs

    def _similarity(self, out, tgt, negs):
        neg_is_pos = (tgt == negs).all(-1)  # (N, M): exact equality, as NeMo (same code => same vector)
        cand = torch.cat([tgt.unsqueeze(0), negs], dim=0)  # (1+N, M, C)
        logits = torch.cosine_similarity(out.float().unsqueeze(0), cand.float(), dim=-1).type_as(out)
        logits = logits / self.cfg.logit_temp
        if neg_is_pos.any():
            logits = torch.cat([logits[:1], logits[1:].masked_fill(neg_is_pos, float("-inf"))], dim=0)
        return logits, neg_is_pos
