"""The masked-token loss straight from encoder frames, without the full (B, T', C, H) log-probs.

`MultiMLMLoss` reads log-probs only at the masked tokens, yet `MultiSoftmaxDecoder.forward` builds them for every
frame: at NEST-L (C = 8192) that is 32 KiB per frame per tensor, several times over (logits, log-probs, their
gradients). `mlm_loss_from_encoded` computes the same loss without keeping that tensor:

    nll[n, h] = -log_softmax(W x_n + b)[target[n, h], h]    for the B*T' frames n, `chunk` frames at a time
    loss      = mean_h  sum_n sel[n] * nll[n, h] / max(1, sum_n sel[n])      (MultiMLMLoss, same arithmetic)

Each chunk runs under activation checkpointing: forward keeps only its NLLs, backward recomputes the chunk's
logits. Peak memory for the head is one chunk's logits instead of all B*T' frames'.

Why chunks over all frames rather than a gather of the masked ones: gathering needs the number of masked tokens,
and reading it on the host stalls the GPU queue every step. A sync-free gather needs a
static capacity, and NEST's masking (overlapping blocks from i.i.d. Bernoulli starts) has no bound on the masked
count below B*T', so any smaller capacity could drop tokens. Chunking is exact and sync-free; the price is one
extra head forward in backward (the head is ~4 % of a NEST-L step's FLOPs: +1 %). Up to `chunk` frames per batch the
loss and every gradient are bit-identical to `MultiMLMLoss(decoder(encoded))`'s (the same ops on the same shapes);
beyond it the logits come from smaller GEMMs and the head's weight gradient is summed slice by slice, so results
agree to fp32 rounding (1e-6 relative on the parity set), not bit for bit. The model takes this path only when
it saves memory (`saves_memory`: B*T' over 1.5 chunks, by measurement; in one slice the recomputed chunk is as
large as the full log-probs and the peak is higher), and nothing hooks its loss module. The health metrics come from
each chunk (argmax, prediction entropy, NLL per frame: no class axis) through `MultiMLMLoss.observers`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nest_ssl.nest.losses import MultiMLMLoss, frame_stats, token_mask

DEFAULT_CHUNK = 1024  # frames per chunk: 1024 x 8192 classes x 4 B = 32 MiB of logits at NEST-L


def _chunk_nll(decoder, x: torch.Tensor, targets: torch.Tensor, with_stats: bool = False):
    """x (B, D, t) frames, targets (B, t, H) -> (B, t, H) NLL, through the decoder's own logits and log-softmax;
    with_stats: also the chunk's argmax and prediction entropy (B, t, H), no graph (losses.frame_stats)."""
    log_probs = torch.log_softmax(decoder.logits(x), dim=2)  # (B, t, C, H), as decoder.forward
    nll = -log_probs.gather(2, targets.long().unsqueeze(2)).squeeze(2)  # (B, t, H)
    if not with_stats:
        return nll
    stats = frame_stats(log_probs, targets)
    return nll, stats["pred"], stats["pred_entropy"]


def frame_nll(decoder, encoded: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK,
              with_stats: bool = False):
    """encoded (B, D, T'), targets (B, T', H) -> (B, T', H) NLL of every frame, about `chunk` frames at a time
    (time slices of all B utterances). When B*T' <= chunk it is one slice: the decoder's exact ops and shapes, so
    even the gradients are bit-identical to decoder.forward + MultiMLMLoss. with_stats: (nll, frame_stats dict)."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk}; must be >= 1")
    B, _, T = encoded.shape
    step = max(1, chunk // B)
    parts = [checkpoint(_chunk_nll, decoder, encoded[:, :, t:t + step], targets[:, t:t + step], with_stats,
                        use_reentrant=False, preserve_rng_state=False)  # the head draws no random numbers
             for t in range(0, T, step)]
    if not with_stats:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    nll, pred, ent = (torch.cat(p, dim=1) for p in zip(*parts))
    return nll, {"pred": pred, "pred_entropy": ent, "nll": nll.detach()}


def saves_memory(encoded: torch.Tensor, chunk: int) -> bool:
    """Whether the chunked head keeps less than the full log-probs: with B*T' frames over 1.5 chunks. Measured
    (memory.head_peak_ratio, NEST-L head, chunk 1024, README): chunked / full peak 1.35 at 512 frames, 1.19 at 1024
    (one slice: backward recomputes logits as large as the full ones), 1.37 at 1025, 0.93 at 1536, 0.71 at 2048,
    0.38 at 4096."""
    return 0 < chunk and 2 * encoded.shape[0] * encoded.shape[2] > 3 * chunk


def mlm_loss_from_encoded(decoder, loss: MultiMLMLoss, masks: torch.Tensor, encoded: torch.Tensor,
                          tokens: torch.Tensor, chunk: int = DEFAULT_CHUNK, lengths=None) -> torch.Tensor:
    """`loss(masks, decoder(encoded), tokens, lengths)` without the full log-probs; sets loss.last_num_selected and
    gives loss.observers the same frame statistics."""
    cfg, H = loss.cfg, loss.cfg.num_decoders
    if decoder.cfg.num_decoders != H:
        raise ValueError(f"decoder num_decoders={decoder.cfg.num_decoders} != loss num_decoders={H}")
    if H == 1 and cfg.squeeze_single:
        tokens = tokens.unsqueeze(-1)
    sel = token_mask(masks, cfg.combine_time_steps, cfg.mask_threshold)  # (B, T')
    if encoded.dim() != 3 or (encoded.shape[0], encoded.shape[2]) != sel.shape:
        raise ValueError(f"encoded shape {tuple(encoded.shape)} does not match the token mask {tuple(sel.shape)} "
                         f"from masks {tuple(masks.shape)} / combine_time_steps={cfg.combine_time_steps}")
    if tokens.dim() != 3 or tokens.shape[-1] != H or tokens.shape[0] != sel.shape[0] \
            or tokens.shape[1] > sel.shape[1]:
        raise ValueError(f"targets shape {tuple(tokens.shape)}: expected (B, T' <= {sel.shape[1]}, H={H})")
    if tokens.shape[1] < sel.shape[1]:  # NeMo right-pads targets with 0 to the mask length
        tokens = F.pad(tokens, (0, 0, 0, sel.shape[1] - tokens.shape[1]))
    if loss.observers:
        nll, frames = frame_nll(decoder, encoded, tokens, chunk, with_stats=True)  # (B, T', H)
    else:
        nll = frame_nll(decoder, encoded, tokens, chunk)  # (B, T', H)
    n = sel.sum()
    # MLMLoss's masked mean per codebook, then MultiMLMLoss's mean over codebooks, in the same order
    out = sum(torch.where(sel, nll[..., h], 0.0).sum() / n.clamp_min(1) for h in range(H)) / H
    loss.last_num_selected = loss.mlm_loss.last_num_selected = n
    for observe in loss.observers:
        observe(loss, masks, frames, tokens, lengths)
    return out
