"""Fine-tune an exported NEST encoder with a CTC head in Hugging Face transformers (a few steps on the CPU).

    python scripts/export.py model.nemo --format hf --out enc_hf/
    python scripts/examples/finetune_hf_ctc.py enc_hf/ --steps 5

ParakeetForCTC = the exported ParakeetEncoder + a fresh 1x1-conv CTC head over characters. The utterances here are
synthetic (tones standing for letters) so that the example runs anywhere; swap in your audio and transcripts.
Prints the CTC loss before and after.
"""
import argparse
import sys

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoModel, ParakeetCTCConfig, ParakeetForCTC

VOCAB = list(" abcdefghijklmnopqrstuvwxyz'")  # blank (= pad_token_id) is the last id
TEXTS = ["a cat", "the dog", "hello", "speech", "nest ssl", "fine tune"]


def synthetic_utterance(text: str, sr: int, rng: np.random.Generator) -> np.ndarray:
    """0.1 s of a letter-specific tone per character, with a little noise."""
    t = np.arange(int(0.1 * sr)) / sr
    tones = [np.sin(2 * np.pi * (200 + 60 * VOCAB.index(c)) * t) for c in text]
    return (0.3 * np.concatenate(tones) + 0.01 * rng.standard_normal(len(tones) * len(t))).astype(np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("encoder_dir", help="a directory written by scripts/export.py --format hf")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    torch.manual_seed(0)

    fe = AutoFeatureExtractor.from_pretrained(args.encoder_dir)
    encoder = AutoModel.from_pretrained(args.encoder_dir)  # ParakeetEncoder
    config = ParakeetCTCConfig(encoder_config=encoder.config.to_dict(), vocab_size=len(VOCAB) + 1,
                               pad_token_id=len(VOCAB))
    model = ParakeetForCTC(config)
    model.encoder.load_state_dict(encoder.state_dict())  # the pretrained encoder; the CTC head starts fresh

    rng = np.random.default_rng(0)
    audio = [synthetic_utterance(text, fe.sampling_rate, rng) for text in TEXTS]
    inputs = fe(audio, sampling_rate=fe.sampling_rate, return_tensors="pt")
    ids = [torch.tensor([VOCAB.index(c) for c in text]) for text in TEXTS]
    labels = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=-100)  # -100: ignored

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    losses = []
    for step in range(args.steps):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step}: ctc loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        final = model(**inputs, labels=labels).loss.item()
    print(f"ctc loss {losses[0]:.4f} -> {final:.4f} after {args.steps} steps")
    return 0 if np.isfinite(final) else 1


if __name__ == "__main__":
    sys.exit(main())
