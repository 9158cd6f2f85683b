"""NEST pretraining entry point (NeMo's masked_token_pred_pretrain.py flags).

    python scripts/pretrain.py --config-path configs --config-name nest_fast-conformer \
        model.train_ds.manifest_filepath=train.json model.validation_ds.manifest_filepath=val.json
    torchrun --nproc_per_node 8 scripts/pretrain.py --config configs/nest_fast-conformer.yaml trainer.max_steps=1000

Exit codes: 0 done; 1 config error (nothing was started); 75 preempted (checkpoint written: requeue the job).
"""

import sys

from nest_ssl.config import ConfigError, config_file_from_args
from nest_ssl.run_config import load_config
from nest_ssl.train import train


def main(argv=None) -> int:
    try:
        path, overrides = config_file_from_args(sys.argv[1:] if argv is None else argv)
        plain, _ = load_config(path, overrides)
    except ValueError as e:  # ConfigError is a ValueError
        print(f"config error: {e}", file=sys.stderr)
        return 1

    try:
        return train(plain)["exit_code"]
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
