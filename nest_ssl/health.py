"""Is it learning? Target-health and collapse metrics for SSL pretraining, computed on the device.

`HealthMonitor` puts forward hooks on the model (no model code changes, no state_dict change) and, for every
micro-batch, adds a few device tensors to per-phase sums ("train" while the model trains, "val" in eval mode):

- masked / unmasked top-1 accuracy per codebook: argmax of the decoder's log-probs vs the quantizer's token, on the
  tokens the loss selects (mask mean > mask_threshold) and on fully unmasked valid tokens;
- target histograms per codebook -> coverage (fraction of the `num_classes` codes seen in the window), entropy (nats),
  perplexity (exp(entropy)) and majority (the most frequent code's share: the accuracy of always guessing it); the
  same for the argmax predictions on masked tokens, and the mean prediction entropy (entropy of the predicted
  distribution, averaged over masked tokens);
- collapse detectors: for a few encoder layers, the variance of the output across time and batch relative to its
  second moment (sum_d Var_frames(x_d) / sum_d E_frames[x_d^2]: 0 when every frame is the same vector, ~1 for
  frames scattered around their mean), and the effective rank (exp of the entropy of the normalised singular values,
  Roy & Vetterli 2007) of the centred final-layer output on a strided subsample of frames;
- for the contrastive model: accuracy of the positive among the negatives, code perplexity and the diversity loss.

Everything is a sum (counts, histograms, first and second moments, a Gram matrix), so the window's value over all
ranks is exact: `collect` concatenates one phase's sums, all-reduces them once, derives the metrics and copies them
to the host once. Call it on log steps only; the step itself never reads a device value. `grad_norms` gives the
gradient norm per parameter group (encoder.pre_encode, each encoder.layers.<i>, decoder, ...), read at the same time.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from nest_ssl.nest.losses import frame_stats, token_mask


@dataclass
class HealthConfig:
    """`trainer.health` (ours): which metrics to keep and the collapse thresholds."""

    enabled: bool = True
    layers: Optional[list] = None   # encoder layer indices for the variance detector; None: first, middle, last
    rank_frames: int = 256          # frames per micro-batch (strided subsample) for the effective rank
    min_frame_var: float = 1e-3     # relative frame variance below this at any watched layer: collapse alarm
    min_eff_rank: float = 2.0       # effective rank of the final layer below this: collapse alarm
    min_target_perplexity: float = 2.0  # a codebook's target perplexity below this: degenerate targets alarm
    context_warmup_steps: int = 100  # from this step on, the context state (prior only / context learned) is told

    def __post_init__(self):
        if self.rank_frames < 2:
            raise ValueError(f"trainer.health.rank_frames={self.rank_frames}; must be >= 2")
        if self.context_warmup_steps < 0:
            raise ValueError(f"trainer.health.context_warmup_steps={self.context_warmup_steps}; must be >= 0")


def entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the distribution proportional to `counts` along the last dim (0 for an empty row)."""
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def effective_rank(gram: torch.Tensor, total: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Effective rank of the centred frames from their sums: gram = sum x x^T (d, d), total = sum x (d,), n frames.
    The centred scatter matrix's eigenvalues are the squared singular values of the centred frame matrix; 0 means
    every frame is the same vector."""
    n = n.clamp_min(1.0)
    mean = total / n
    scatter = gram - n * torch.outer(mean, mean)  # (d, d) = Xc^T Xc
    eig = torch.linalg.eigvalsh(scatter.double())
    floor = 1e-10 * gram.diagonal().sum()  # below: float64 cancellation noise of gram - n m m^T, not a direction
    sv = torch.where(eig > floor, eig, 0.0).sqrt()
    return torch.where(sv.sum() > 0, torch.exp(entropy(sv)), 0.0)  # 0: every frame is the same vector


def frame_moments(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x (B, T, d), valid (B, T) -> (3, d) float64: [count, sum x, sum x^2] over the valid frames."""
    w = valid.to(torch.float64).unsqueeze(-1)  # (B, T, 1)
    xd = x.detach().to(torch.float64) * w
    count = w.sum((0, 1)).expand(x.shape[-1])
    return torch.stack([count, xd.sum((0, 1)), (xd * x.detach().to(torch.float64)).sum((0, 1))])


def relative_frame_variance(moments: torch.Tensor) -> torch.Tensor:
    """(..., 3, d) moments -> sum_d Var(x_d) / sum_d E[x_d^2] (0: all frames equal)."""
    n = moments[..., 0, :].clamp_min(1.0)
    mean, second = moments[..., 1, :] / n, moments[..., 2, :] / n
    return (second - mean * mean).clamp_min(0.0).sum(-1) / second.sum(-1).clamp_min(1e-30)


def subsample_gram(x: torch.Tensor, valid: torch.Tensor, max_frames: int) -> dict:
    """Sums for the effective rank over a strided subsample of at most ~max_frames of the B*T frames."""
    flat, w = x.detach().reshape(-1, x.shape[-1]), valid.reshape(-1)  # (B*T, d), (B*T,)
    stride = max(1, math.ceil(flat.shape[0] / max_frames))  # from shapes only: no host sync
    flat, w = flat[::stride].to(torch.float64), w[::stride].to(torch.float64)
    xw = flat * w[:, None]
    return {"rank_gram": xw.T @ flat, "rank_sum": xw.sum(0), "rank_n": w.sum()}


def token_stats(log_probs: torch.Tensor, tokens: torch.Tensor, selected: torch.Tensor, valid: torch.Tensor,
                unmasked: torch.Tensor) -> dict:
    """token_sums of the full log-probs (B, T, C, H)."""
    return token_sums(frame_stats(log_probs, tokens), tokens, selected, valid, unmasked, log_probs.shape[-2])


def token_sums(frames: dict, tokens: torch.Tensor, selected: torch.Tensor, valid: torch.Tensor,
               unmasked: torch.Tensor, num_classes: int) -> dict:
    """frame_stats (B, T, H) each, tokens (B, T, H), selected / valid / unmasked (B, T) bool -> per-codebook sums:
    correct and count on masked (selected) and unmasked tokens, target and prediction histograms (H, C), summed
    prediction entropy and summed NLL (the masked-token loss) on masked tokens."""
    H, pred = tokens.shape[-1], frames["pred"]
    hit = (pred == tokens).to(torch.float64)
    sel, unm = selected.to(torch.float64), (unmasked & valid).to(torch.float64)
    masked_sum = lambda x: (x.to(torch.float64) * sel[..., None]).sum((0, 1))  # noqa: E731  (B, T, H) -> (H,)
    return {
        "masked_correct": masked_sum(hit), "masked_n": sel.sum().expand(H),
        "unmasked_correct": (hit * unm[..., None]).sum((0, 1)), "unmasked_n": unm.sum().expand(H),
        "target_hist": histogram(tokens, valid, num_classes), "pred_hist": histogram(pred, selected, num_classes),
        "pred_entropy_sum": masked_sum(frames["pred_entropy"]), "masked_nll_sum": masked_sum(frames["nll"]),
    }


def miller_madow_entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the distribution behind `counts` (last dim): the plug-in estimate plus Miller-Madow's
    (m - 1) / 2N, m the codes seen, N the count. The plug-in estimate is biased low by about that much, which would
    bias the context gain low; with the running histogram N is large, so the correction is small (63 / 2N nats for
    64 codes all seen)."""
    n = counts.sum(-1)
    seen = (counts > 0).sum(-1).to(counts.dtype)
    return entropy(counts) + (seen - 1).clamp_min(0) / (2 * n.clamp_min(1))


def histogram(ids: torch.Tensor, weight: torch.Tensor, num_classes: int) -> torch.Tensor:
    """ids (B, T, H) in [0, C), weight (B, T) -> (H, C) float64 counts (scatter_add: bincount would sync on CUDA)."""
    H = ids.shape[-1]
    offset = torch.arange(H, device=ids.device) * num_classes  # (H,)
    flat = (ids.long() + offset).reshape(-1)
    w = weight.to(torch.float64)[..., None].expand(ids.shape).reshape(-1)
    return torch.zeros(H * num_classes, dtype=torch.float64, device=ids.device).scatter_add_(0, flat, w).view(
        H, num_classes)


def context_gain(s: dict) -> dict:
    """masked_loss_<h> (mean NLL of codebook h's masked tokens) and context_gain_<h> = the code prior's entropy
    (Miller-Madow, from the running histogram `prior_hist`, else this window's) minus masked_loss_<h>, in nats: what
    the model knows beyond the code frequencies. context_gain is the mean over codebooks. NaN when no token was
    masked in the window."""
    if "masked_nll_sum" not in s:
        return {}
    prior, n = s.get("prior_hist", s["target_hist"]), s["masked_n"]
    loss = torch.where(n > 0, s["masked_nll_sum"] / n.clamp_min(1), math.nan)  # (H,)
    gain = miller_madow_entropy(prior) - loss
    m = {f"masked_loss_{h}": loss[h] for h in range(loss.shape[0])}
    return m | {f"context_gain_{h}": gain[h] for h in range(gain.shape[0])} | {"context_gain": gain.mean()}


def grad_group(name: str) -> str:
    """Parameter name -> its group: encoder.pre_encode, encoder.layers.<i>, encoder.<other>, or the top module."""
    parts = name.split(".")
    if parts[0] == "encoder" and len(parts) > 2:
        return ".".join(parts[:3]) if parts[1] == "layers" else ".".join(parts[:2])
    return parts[0] if len(parts) > 1 else "other"


def grad_norms(model: nn.Module) -> dict:
    """{group: L2 norm of its gradients} as 0-dim device tensors (read them with the log step's one copy)."""
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            groups.setdefault(grad_group(name), []).append(p.grad)
    return {g: torch.nn.utils.get_total_norm(grads) for g, grads in groups.items()}


class HealthMonitor:
    """Hooks on a NEST (or contrastive) model that sum the health statistics of every forward, per phase.

    `collect(phase)` (log steps only) reduces one phase over all ranks and returns {metric: float}; `alarms(metrics)`
    names the collapse symptoms it shows. A model without an encoder / NEST loss gets no hooks (grad norms only)."""

    def __init__(self, model: nn.Module, cfg: Optional[HealthConfig] = None):
        self.cfg, self.model = cfg or HealthConfig(), model
        self.sums: dict[str, dict] = {"train": {}, "val": {}}
        self.prior_hist: dict[str, torch.Tensor] = {}  # phase -> running target histogram since the start (H, C)
        self.context_learned: dict[str, Optional[bool]] = {"train": None, "val": None}  # last told state
        self.handles, self._layer_out, self._paused, self.observed = [], {}, False, None
        encoder = getattr(model, "encoder", None)
        if not self.cfg.enabled or encoder is None or not hasattr(encoder, "layers"):
            return
        n = len(encoder.layers)
        self.layers = sorted(set(self.cfg.layers if self.cfg.layers is not None else [0, n // 2, n - 1]))
        bad = [i for i in self.layers if not 0 <= int(i) < n]
        if bad:
            raise ValueError(f"trainer.health.layers={self.cfg.layers}: {bad} out of range 0..{n - 1}")
        for i in self.layers:
            self.handles.append(encoder.layers[i].register_forward_hook(self._save_layer(i)))
        self.handles.append(encoder.register_forward_hook(self._on_encoder))
        loss = getattr(model, "loss", None)
        if loss is not None and hasattr(loss, "observers"):  # MultiMLMLoss: per-frame stats, full or chunked head
            loss.observers.append(self._on_frames)
            self.observed = loss
        for head in getattr(model, "decoder_losses", {}).values():  # contrastive heads keep `last` after forward
            if hasattr(head["loss"], "quantizer") or hasattr(head["loss"], "target_proj"):
                self.handles.append(head["loss"].register_forward_hook(self._on_contrastive))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.observed is not None:
            self.observed.observers.remove(self._on_frames)
            self.observed = None

    def state_dict(self) -> dict:
        """What a resume needs for the same metrics as an uninterrupted run: the running code-prior histograms
        (all-reduced, so the same on every rank: saved once) and the last told context state. The window's sums are
        not in it: checkpoints follow log steps and validations, which reset them."""
        return {"prior_hist": {k: v.detach().cpu() for k, v in self.prior_hist.items()},
                "context_learned": dict(self.context_learned)}

    def load_state_dict(self, state: dict) -> None:
        device = next(self.model.parameters()).device
        self.prior_hist = {k: v.to(device=device, dtype=torch.float64) for k, v in state["prior_hist"].items()}
        self.context_learned = {**self.context_learned, **state["context_learned"]}

    def _phase(self) -> str:
        return "train" if self.model.training else "val"

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside add nothing (e.g. FSDP's stand-in forwards of a rank without a validation batch)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _add(self, values: dict) -> None:
        if self._paused:
            return
        sums = self.sums[self._phase()]
        for k, v in values.items():
            v = v.detach().to(torch.float64)
            sums[k] = sums[k] + v if k in sums else v

    # ---- hooks (device work only) ---------------------------------------------------------------------
    def _save_layer(self, i: int):
        def hook(module, args, out):
            self._layer_out[i] = out[0] if isinstance(out, tuple) else out  # (B, T', d)
        return hook

    @torch.no_grad()
    def _on_encoder(self, module, args, out) -> None:
        encoded, lengths = out  # (B, d, T'), (B,)
        x = encoded.transpose(1, 2)  # (B, T', d)
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # (B, T')
        moments = {f"moments_layer{i}": frame_moments(self._layer_out.pop(i), valid) for i in self.layers}
        self._add({**moments, "moments_final": frame_moments(x, valid),
                   **subsample_gram(x, valid, self.cfg.rank_frames)})

    @torch.no_grad()
    def _on_frames(self, module, masks, frames: dict, tokens, lengths) -> None:
        """MultiMLMLoss observer: frames {pred, pred_entropy, nll} (B, T', H), tokens (B, T'', H)."""
        c, thr = module.cfg.combine_time_steps, module.cfg.mask_threshold
        selected, touched = token_mask(masks, c, thr), token_mask(masks, c, 0.0)  # (B, T')
        T = min(frames["pred"].shape[1], tokens.shape[1], selected.shape[1])
        valid = torch.ones_like(selected[:, :T])
        if lengths is not None:
            valid = torch.arange(T, device=selected.device)[None, :] < lengths[:, None]
        frames = {k: v[:, :T] for k, v in frames.items()}
        self._add(token_sums(frames, tokens[:, :T], selected[:, :T] & valid, valid, ~touched[:, :T],
                             self.model.decoder.cfg.num_classes))

    @torch.no_grad()
    def _on_contrastive(self, module, args, out) -> None:
        last = module.last
        logits = last["similarity"].float()  # (1 + N, M): the positive at row 0
        stats = {"contrastive_correct": (logits.argmax(0) == 0).sum(), "contrastive_n": logits.new_tensor(
            logits.shape[1])}
        if last.get("prob_ppl") is not None:
            q = module.quantizer
            stats.update(diversity_sum=last["prob_ppl"], code_ppl_sum=q.groups * q.num_vars * (1 - last["prob_ppl"]),
                         contrastive_batches=logits.new_tensor(1.0))
        self._add(stats)

    # ---- log steps ------------------------------------------------------------------------------------
    def collect(self, phase: str = "train", extra: Optional[dict] = None) -> dict:
        """Reduce `phase`'s sums over all ranks (one all-reduce), reset them, and return {name: float}; `extra`
        {name: device scalar} (e.g. grad_norms, identical on all ranks) rides along in the same host copy."""
        sums, self.sums[phase] = self._same_keys_on_every_rank(self.sums[phase]), {}
        keys = sorted(sums)
        if keys:
            flat = torch.cat([sums[k].reshape(-1) for k in keys])
            if dist.is_initialized():
                dist.all_reduce(flat)
            parts = flat.split([sums[k].numel() for k in keys])
            sums = {k: p.view(sums[k].shape) for k, p in zip(keys, parts)}
        if "target_hist" in sums:  # the code prior: targets since the start of the run, not one window
            running = self.prior_hist.get(phase)
            self.prior_hist[phase] = sums["prior_hist"] = sums["target_hist"] + (0 if running is None else running)
        metrics = derive(sums)
        metrics.update({f"grad_norm/{k}": v for k, v in (extra or {}).items()})
        if not metrics:
            return {}
        values = [torch.as_tensor(v, dtype=torch.float64) for v in metrics.values()]
        values = torch.stack([v.to(values[0].device) for v in values]).tolist()  # the one device-to-host copy
        return dict(zip(metrics, values))

    def _same_keys_on_every_rank(self, sums: dict) -> dict:
        """`sums` with a zero for every key another rank has. A rank that ran no forward of the phase (validation
        with fewer batches than ranks) has no sums; had it skipped the all-reduce the others enter, every rank would
        wait forever. Zeros are the identity of a sum, so the result is unchanged. Costs one small object gather per
        collect on a model with hooks (log steps and validations only)."""
        if not dist.is_initialized() or not self.handles:
            return sums  # no hooks: no sums on any rank, nothing to all-reduce anywhere
        shapes = [None] * dist.get_world_size()
        dist.all_gather_object(shapes, {k: tuple(v.shape) for k, v in sums.items()})
        device = next(iter(sums.values())).device if sums else next(self.model.parameters()).device
        zeros = {k: torch.zeros(shape, dtype=torch.float64, device=device) for s in shapes for k, shape in s.items()}
        return zeros | sums

    def alarms(self, metrics: dict, step: int = 0, phase: str = "train", context: bool = True) -> list[str]:
        """Collapse symptoms in collected metrics, as readable sentences (empty: none), and with `context`, from
        `step` >= context_warmup_steps on, each change of the context state: "predicting the code prior only" when
        `context_gain` (mean over codebooks) is <= 0, "context learned" when it turns positive."""
        out = self._context_alarm(metrics.get("context_gain"), step, phase) if context else []
        for k, v in metrics.items():
            if k.startswith("frame_var_") and v < self.cfg.min_frame_var:
                out.append(f"{k}={v:.3g} < {self.cfg.min_frame_var}: encoder frames nearly identical (collapse)")
            elif k == "eff_rank" and v < self.cfg.min_eff_rank:
                out.append(f"eff_rank={v:.3g} < {self.cfg.min_eff_rank}: final layer spans ~1 direction (collapse)")
            elif k.startswith("target_perplexity_") and v < self.cfg.min_target_perplexity:
                out.append(f"{k}={v:.3g} < {self.cfg.min_target_perplexity}: the quantizer gives ~one code "
                           "(silent or constant input?)")
        return out

    def _context_alarm(self, gain: Optional[float], step: int, phase: str) -> list[str]:
        if gain is None or math.isnan(gain) or step < self.cfg.context_warmup_steps:
            return []
        learned = gain > 0
        if learned == self.context_learned[phase]:
            return []  # told once per change: the train window's gain is noisy, a line per log step would flood
        self.context_learned[phase] = learned
        if learned:
            return [f"{phase} context_gain={gain:.3g} > 0: context learned (masked loss below the code prior's "
                    "entropy)"]
        return [f"{phase} context_gain={gain:.3g} <= 0: predicting the code prior only (no context learned yet)"]


def derive(s: dict) -> dict:
    """Summed statistics -> metrics (device tensors; keys depend on which hooks fired)."""
    m = {}
    if "masked_n" in s:
        for h in range(s["masked_n"].shape[0]):
            m[f"masked_acc_{h}"] = s["masked_correct"][h] / s["masked_n"][h].clamp_min(1)
            m[f"unmasked_acc_{h}"] = s["unmasked_correct"][h] / s["unmasked_n"][h].clamp_min(1)
            m[f"mean_pred_entropy_{h}"] = s["pred_entropy_sum"][h] / s["masked_n"][h].clamp_min(1)
            for kind in ("target", "pred"):
                hist = s[f"{kind}_hist"][h]
                ent = entropy(hist)
                m[f"{kind}_coverage_{h}"] = (hist > 0).double().mean()
                m[f"{kind}_majority_{h}"] = hist.max() / hist.sum().clamp_min(1)  # the most frequent code's share
                m[f"{kind}_entropy_{h}"], m[f"{kind}_perplexity_{h}"] = ent, ent.exp()
        m.update(context_gain(s))
    for k in [k for k in s if k.startswith("moments_")]:
        m[f"frame_var_{k[len('moments_'):]}"] = relative_frame_variance(s[k])
    if "rank_gram" in s:
        m["eff_rank"] = effective_rank(s["rank_gram"], s["rank_sum"], s["rank_n"])
    if "contrastive_n" in s:
        m["contrastive_acc"] = s["contrastive_correct"] / s["contrastive_n"].clamp_min(1)
    if "contrastive_batches" in s:
        m["code_perplexity"] = s["code_ppl_sum"] / s["contrastive_batches"]
        m["diversity_loss"] = s["diversity_sum"] / s["contrastive_batches"]
    return m
