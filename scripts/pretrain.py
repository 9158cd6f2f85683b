"""usage: pretrain.py (--config FILE | --config-path DIR --config-name NAME | FILE) [OVERRIDE ...] [--debug]

NEST pretraining entry point, with the flags of NeMo's masked_token_pred_pretrain.py.

    python scripts/pretrain.py --config-path configs --config-name nest_fast-conformer \\
        model.train_ds.manifest_filepath=train.json model.validation_ds.manifest_filepath=val.json
    torchrun --nproc_per_node 8 scripts/pretrain.py --config configs/nest_fast-conformer.yaml trainer.max_steps=1000

OVERRIDE: Hydra's syntax: a.b=1 (set), +a.new=1 (add), ++a.b=1 (set or add), ~a.b (delete).
--debug: show the Python traceback of a config or data error (by default one line names the key or file:line).

Exit codes: 0 done; 1 config or data error, or a collective that failed or timed out (trainer.collective_timeout)
(one line on stderr naming the rank and the phase); 74 no space left for a checkpoint (the partial file
is removed, the previous checkpoints are intact); 75 preempted (checkpoint written: requeue the job); 130 stopped
by Ctrl-C (checkpoint written at the current step; a second Ctrl-C aborts at once, without one).
"""

import os
import sys

import torch

from nest_ssl import cpu_run
from nest_ssl.checkpoint import DISK_FULL_EXIT_CODE, DiskFullError
from nest_ssl.cli import USER_ERRORS, one_line
from nest_ssl.config import config_file_from_args
from nest_ssl.data.wrapper import TooManyBadSamples
from nest_ssl.distributed import CollectiveError
from nest_ssl.run_config import load_config
from nest_ssl.train import train

# A rank that ended because another rank stopped answering is one line too (that rank's own error is in its log), and
# so is data with more bad items than max_bad_samples allows (at start-up or in the loop, where the note says where
# the training state was saved).
STOP_ERRORS = USER_ERRORS + (CollectiveError, TooManyBadSamples)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return 0
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        path, overrides = config_file_from_args(argv)
        plain, _ = load_config(path, overrides)
        return run(plain)
    except DiskFullError as e:
        if debug:
            raise
        print(f"error: {e.strerror}", file=sys.stderr)
        return DISK_FULL_EXIT_CODE
    except STOP_ERRORS as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1


def run(plain: dict) -> int:
    """train(plain)'s exit code; on a CPU the thread count and the loader settings are chosen first and said."""
    if not cpu_run.is_cpu_run(plain):
        return train(plain)["exit_code"]
    threads = torch.get_num_threads()
    try:
        for line in filter(None, (cpu_run.pick_threads(), cpu_run.adjust_loaders(plain))):
            if os.environ.get("RANK", "0") == "0":
                print(line, flush=True)
        return train(plain)["exit_code"]
    finally:
        torch.set_num_threads(threads)  # a caller in this process (a test) keeps its own setting


if __name__ == "__main__":
    sys.exit(main())
