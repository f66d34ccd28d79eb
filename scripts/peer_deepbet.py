"""Runs deepbet 1.0.2 (a peer of infl8 in scripts/bench-brain.sh) on one scan.

Usage: .cache/venv-peers/bin/python scripts/peer_deepbet.py IMAGE MASK_OUT

deepbet's own defaults (threshold 0.5, no dilation, its largest-component and
hole-filling post-processing) on the CPU. Its Python API rather than its CLI:
the CLI silently skips files under 100 kB, which a thick-slice scan can be.
"""

import sys

from deepbet.bet import BrainExtraction


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    image, mask = sys.argv[1:]
    BrainExtraction(no_gpu=True).run(image, mask_path=mask)
    return 0


if __name__ == "__main__":
    sys.exit(main())
