"""nest_ssl: NEST self-supervised speech pretraining in plain PyTorch, NeMo-compatible."""
__version__ = "0.1.0"
