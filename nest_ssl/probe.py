"""A SUPERB-style frozen-encoder probe: how much a checkpoint's features already know, as one number.

The encoder is frozen and run once over two small labelled manifests; its hidden states (index 0: the subsampling
output, i: the output of encoder layer i-1; `layers` picks some or "all") are cached on the host in fp16
(utterances x states x T' x d_model x 2 bytes) and standardised per state and feature with the training frames'
statistics. A learned softmax-weighted sum of those states feeds a small head
(a per-frame MLP, `hidden` units, or linear with hidden 0) trained for a fixed budget of `steps` with AdamW:

- task `ctc`: characters of the manifest's `text` (NeMo's AudioToCharDataset / TarredAudioToCharDataset), CTC loss,
  greedy decoding; reports `probe_cer` and `probe_wer` (edit distance / reference length, over the eval set);
- task `classification`: the manifest's `label` (AudioToLabelDataset), mean-pooled over valid frames, cross-entropy;
  reports `probe_acc`.

Both report the learned layer weights. Everything draws from one seed inside `torch.random.fork_rng`, so a probe run
inside training leaves the training RNG streams untouched, and two runs with the same seed give the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nest_ssl.data.char_dataset import AudioToCharDataset, AudioToLabelDataset, TarredAudioToCharDataset, char_collate
from nest_ssl.data.manifest import read_manifests
from nest_ssl.data.tarred import shard_list

TASKS = ("ctc", "classification")


@dataclass
class ProbeConfig:
    """`trainer.probe` (ours; off by default) and scripts/probe.py's settings."""

    enabled: bool = False
    every_n_steps: int = 1000           # in training: run the probe every N optimizer steps
    task: str = "ctc"                   # ctc | classification
    train_manifest: Optional[str] = None
    eval_manifest: Optional[str] = None
    train_tarred_audio_filepaths: Optional[str] = None  # NeMo shards; train_manifest is then the tarred manifest
    eval_tarred_audio_filepaths: Optional[str] = None
    labels: Optional[list] = None       # characters (ctc) or class names; None: every one seen in train_manifest
    layers: Any = "all"                 # "all" or hidden-state indices (0: subsampling output, i: layer i-1)
    steps: int = 400                    # head training steps
    batch_size: int = 16
    lr: float = 2e-3
    hidden: int = 256                   # head MLP width; 0: a linear head
    dropout: float = 0.2                # on the head's inputs and hidden units (small labelled sets overfit)
    seed: int = 0
    max_duration: Optional[float] = None  # drop longer utterances

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"probe task={self.task!r}; allowed: {list(TASKS)}")
        if self.enabled and not (self.train_manifest and self.eval_manifest):
            raise ValueError("trainer.probe.enabled needs train_manifest and eval_manifest (NeMo manifests with "
                             "`text`, or `label` for task classification)")
        for name in ("every_n_steps", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe {name}={getattr(self, name)}; must be >= 1")


# ---- data ---------------------------------------------------------------------------------------------
def default_labels(entries, task: str) -> list[str]:
    if task == "classification":
        missing = [e.audio_filepath for e in entries if e.label is None]
        if missing:
            raise ValueError(f"probe task classification: {len(missing)} manifest lines have no `label` "
                             f"(first: {missing[0]})")
        return sorted({e.label for e in entries})
    return sorted({c for e in entries for c in e.text.lower()})


def build_dataset(manifest: str, tarred: Optional[str], labels: list[str], sample_rate: int, task: str,
                  max_duration: Optional[float] = None):
    entries = read_manifests(manifest, max_duration=max_duration)
    if task == "classification":
        if tarred:
            raise ValueError("probe task classification reads plain manifests; tarred shards are for task ctc")
        return AudioToLabelDataset(entries, labels, sample_rate)
    if tarred:
        return TarredAudioToCharDataset(entries, shard_list(tarred, 0, 1, "replicate"), labels, sample_rate)
    return AudioToCharDataset(entries, labels, sample_rate)


@torch.no_grad()
def hidden_states(model: nn.Module, audio: torch.Tensor, lengths: torch.Tensor):
    """-> ((B, S, T', d) hidden states: the subsampling output then every encoder layer's, (B,) frame counts)."""
    captured = []
    hook = (lambda mod, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
    handles = [model.encoder.pre_encode.register_forward_hook(hook)]
    handles += [layer.register_forward_hook(hook) for layer in model.encoder.layers]
    try:
        feats, feat_len = model.preprocessor(audio, lengths)  # (B, F, T)
        _, encoded_len = model.encoder(feats, feat_len)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(captured, dim=1), encoded_len  # (B, S, T', d)


def extract(model: nn.Module, dataset, states: list[int], batch_size: int) -> list[tuple]:
    """[(hidden (S, T', d) fp16 on the host, target ids)] for every readable item of `dataset` (a frozen pass)."""
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=char_collate)
    items = []
    for batch in loader:
        if batch is None:
            continue
        audio, a_len, tokens, t_len = batch
        h, h_len = hidden_states(model, audio.to(device), a_len.to(device))
        h, h_len = h[:, states].half().cpu(), h_len.cpu()
        items += [(h[b, :, : int(h_len[b])].clone(), tokens[b, : int(t_len[b])]) for b in range(h.shape[0])]
    if not items:
        raise ValueError("probe: no readable utterance in the manifest")
    return items


# ---- head ---------------------------------------------------------------------------------------------
class WeightedSumHead(nn.Module):
    """Softmax-weighted sum of S hidden states -> per-frame MLP -> n_out scores per frame (ctc) or utterance."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, n_out: int, hidden: int, task: str,
                 dropout: float = 0.0):
        """mean, std (S, d): per-state, per-feature statistics of the training frames. States differ in scale and
        a random-init encoder's frames differ from each other by ~1% of their common mean; standardising makes
        every state's variation visible to the head."""
        super().__init__()
        num_states, d_model = mean.shape
        self.task = task
        self.register_buffer("mean", mean[None, :, None, :])  # (1, S, 1, d)
        self.register_buffer("std", std[None, :, None, :].clamp_min(1e-5))
        self.layer_logits = nn.Parameter(torch.zeros(num_states))
        # (B, d, T) -> (B, n_out, T); the first layer sees one frame either side (a character spans ~2-4 frames)
        self.mlp = (nn.Sequential(nn.Dropout(dropout), nn.Conv1d(d_model, hidden, 3, padding=1), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Conv1d(hidden, n_out, 1))
                    if hidden else nn.Sequential(nn.Dropout(dropout), nn.Conv1d(d_model, n_out, 1)))

    def layer_weights(self) -> torch.Tensor:
        return torch.softmax(self.layer_logits, 0)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """h (B, S, T, d), lengths (B,) -> (B, T, n_out) log-probs (ctc) or (B, n_out) logits (classification)."""
        x = torch.einsum("s,bstd->btd", self.layer_weights(), (h - self.mean) / self.std)  # (B, T, d)
        valid = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).float()  # (B, T)
        x = x * valid[..., None]  # padding frames are zeros for the conv's context
        if self.task == "ctc":
            return torch.log_softmax(self.mlp(x.transpose(1, 2)).transpose(1, 2), -1)  # (B, T, n_out)
        pooled = x.sum(1) / valid.sum(1, keepdim=True).clamp_min(1)  # (B, d)
        return self.mlp(pooled[..., None])[..., 0]  # (B, n_out)


def frame_statistics(items: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (S, d) over every frame of every item."""
    frames = torch.cat([x[0].float() for x in items], dim=1)  # (S, sum T', d)
    return frames.mean(1), frames.std(1)


def pad_batch(items: list[tuple]):
    """-> (h (B, S, Tmax, d) fp32, h_len (B,), targets (B, Umax), target_len (B,))."""
    h_len = torch.tensor([x[0].shape[1] for x in items])
    t_len = torch.tensor([len(x[1]) for x in items])
    S, d = items[0][0].shape[0], items[0][0].shape[2]
    h = torch.zeros(len(items), S, int(h_len.max()), d)
    t = torch.zeros(len(items), max(int(t_len.max()), 1), dtype=torch.long)
    for i, (x, y) in enumerate(items):
        h[i, :, : x.shape[1]], t[i, : len(y)] = x.float(), y
    return h, h_len, t, t_len


def head_loss(head: WeightedSumHead, batch, blank: int) -> torch.Tensor:
    h, h_len, t, t_len = batch
    out = head(h, h_len)
    if head.task == "classification":
        return F.cross_entropy(out, t[:, 0])
    return F.ctc_loss(out.transpose(0, 1), t, h_len, t_len, blank=blank, zero_infinity=True)  # (T, B, V+1)


def train_head(head: WeightedSumHead, items: list, cfg: ProbeConfig, blank: int, device) -> float:
    """`cfg.steps` AdamW steps on random batches; returns the mean loss of the last 10% of steps."""
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr)
    order = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in range(cfg.steps):
        idx = torch.randint(len(items), (min(cfg.batch_size, len(items)),), generator=order).tolist()
        h, h_len, t, t_len = pad_batch([items[i] for i in idx])
        loss = head_loss(head, (h.to(device), h_len.to(device), t.to(device), t_len.to(device)), blank)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


# ---- scoring ------------------------------------------------------------------------------------------
def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def greedy_ctc(log_probs: torch.Tensor, length: int, blank: int) -> list[int]:
    """Best path: argmax per frame, repeats merged, blanks dropped."""
    best = log_probs[:length].argmax(-1).tolist()
    return [c for i, c in enumerate(best) if c != blank and (i == 0 or c != best[i - 1])]


@torch.no_grad()
def score(head: WeightedSumHead, items: list, labels: list[str], device) -> dict:
    blank, errors = len(labels), {"char": [0, 0], "word": [0, 0], "acc": [0, 0]}
    for start in range(0, len(items), 32):
        chunk = items[start:start + 32]
        h, h_len, t, t_len = pad_batch(chunk)
        out = head(h.to(device), h_len.to(device)).cpu()
        for b, (_, target) in enumerate(chunk):
            if head.task == "classification":
                errors["acc"][0] += int(out[b].argmax() == target[0])
                errors["acc"][1] += 1
                continue
            hyp = "".join(labels[c] for c in greedy_ctc(out[b], int(h_len[b]), blank))
            ref = "".join(labels[c] for c in target.tolist())
            errors["char"][0] += edit_distance(hyp, ref)
            errors["char"][1] += len(ref)
            errors["word"][0] += edit_distance(hyp.split(), ref.split())
            errors["word"][1] += len(ref.split())
    if head.task == "classification":
        return {"probe_acc": errors["acc"][0] / errors["acc"][1]}
    return {"probe_cer": errors["char"][0] / max(errors["char"][1], 1),
            "probe_wer": errors["word"][0] / max(errors["word"][1], 1)}


def select_states(layers, num_states: int) -> list[int]:
    if layers == "all":
        return list(range(num_states))
    states = [int(i) for i in (layers.split(",") if isinstance(layers, str) else layers)]
    bad = [i for i in states if not 0 <= i < num_states]
    if bad or not states:
        raise ValueError(f"probe layers={layers!r}: indices must lie in 0..{num_states - 1} (0: subsampling "
                         "output, i: encoder layer i-1) or be 'all'")
    return states


def run_probe(model: nn.Module, cfg: ProbeConfig) -> dict:
    """Freeze `model` (a NEST model on its device), fit the probe head, score the eval manifest. Returns the score
    (`probe_cer`, `probe_wer` or `probe_acc`), `probe_train_loss` and `layer_weights` (a list)."""
    device = next(model.parameters()).device
    sample_rate = int(model.preprocessor.cfg.sample_rate)
    labels = list(cfg.labels) if cfg.labels else default_labels(read_manifests(cfg.train_manifest), cfg.task)
    states = select_states(cfg.layers, len(model.encoder.layers) + 1)
    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        model.eval()
        try:
            sets = [extract(model, build_dataset(m, tar, labels, sample_rate, cfg.task, cfg.max_duration), states,
                            cfg.batch_size)
                    for m, tar in ((cfg.train_manifest, cfg.train_tarred_audio_filepaths),
                                   (cfg.eval_manifest, cfg.eval_tarred_audio_filepaths))]
        finally:
            model.train(was_training)
        n_out = len(labels) + 1 if cfg.task == "ctc" else len(labels)
        head = WeightedSumHead(*frame_statistics(sets[0]), n_out, cfg.hidden, cfg.task, cfg.dropout).to(device)
        train_loss = train_head(head, sets[0], cfg, blank=len(labels), device=device)
        result = score(head.eval(), sets[1], labels, device)
    return {**result, "probe_train_loss": train_loss, "layer_weights": head.layer_weights().tolist(),
            "states": states}


# ---- the demo -----------------------------------------------------------------------------------------
def find_demo_checkpoint(root: str) -> Optional[str]:
    """The newest `.nemo` (best by val_loss) under `root`, else the newest `-last.ckpt`; None if neither."""
    from pathlib import Path

    for pattern in ("*.nemo", "*-last.ckpt"):
        found = sorted(Path(root).rglob(pattern), key=lambda p: p.stat().st_mtime)
        if found:
            return str(found[-1])
    return None


def demo(out_dir: str, checkpoint: Optional[str], model_cfg: dict, seed: int = 0, steps: int = 400,
         num_train: int = 160, num_eval: int = 48, progress=None) -> list[dict]:
    """Synthetic labelled corpus (nest_ssl.data.probe_corpus) -> both probe tasks on a random-init encoder (seeded,
    the checkpoint's architecture when there is one) and on `checkpoint`. Returns one row per (encoder, task).
    `progress(line)` hears what is being done as it starts (the whole demo is minutes of CPU)."""
    import time
    from pathlib import Path

    from nest_ssl.data.probe_corpus import write_probe_corpus
    from nest_ssl.export import load_pretrained, read_checkpoint
    from nest_ssl.nemo_compat import build_model

    t0, say = time.time(), progress or (lambda line: None)
    say(f"probe demo: writing the labelled corpus ({num_train} train, {num_eval} eval) under {out_dir}")
    corpus = write_probe_corpus(Path(out_dir), num_train, num_eval, seed)
    encoders = {}
    if checkpoint:
        model_cfg = read_checkpoint(checkpoint)[0]
    torch.manual_seed(seed)
    encoders["random init"] = build_model(model_cfg)
    if checkpoint:
        encoders[checkpoint] = load_pretrained(checkpoint)
    rows = []
    for name, model in encoders.items():
        for task, labels in (("ctc", corpus["labels"]), ("classification", corpus["classes"])):
            cfg = ProbeConfig(task=task, train_manifest=corpus["train"], eval_manifest=corpus["eval"], labels=labels,
                              steps=steps, seed=seed)
            say(f"probe demo: {len(rows) + 1}/{2 * len(encoders)} {name}, {task} ({steps} head steps), "
                f"{time.time() - t0:.0f} s")
            rows.append({"encoder": name, "task": task, **run_probe(model, cfg)})
    return rows
