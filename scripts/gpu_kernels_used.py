#!/usr/bin/env python
"""GPU check, step 1: `auto` picks the Triton kernels on this CUDA device and they really run (else exit 1)."""
import argparse
import json
import sys

import torch

from nest_ssl.conformer.kernel_check import check_kernels_used


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="JSON file with the implementations chosen and the kernel calls")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels_used: no CUDA device", file=sys.stderr)
        return 1
    result = check_kernels_used(torch.device("cuda"))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
