"""NeMo's contrastive (wav2vec-2.0-style) SSL: `SpeechEncDecSelfSupervisedModel` and its heads.

Spec: shared/spec/contrastive_ssl.md. Parity: tests/fixtures/parity/contrastive_tiny.
"""
