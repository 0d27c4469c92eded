"""Write mode-hf's own calibration samples for the peers: one PNG per image and a JSON Lines file.

    python benchmarks/peers/write_calibration.py OUT_DIR [--count 16] [--seed SEED]

Each line of OUT_DIR/calibration.jsonl is {"image": "/abs/path/i.png" or null, "text": "..."}: the samples of
`mode_hf.bench.tasks.calibration_samples(count, seed)` (the bench's ~3 vision : 1 text mix; the text holds the prompt
and the answer), in their order. benchmarks/peers/run_peer.py reads it (in a peer's venv, without mode_hf); mode-hf
reads the same file with `load_calibration(path)`, so every method sees the same samples.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mode_hf.bench import tasks
from mode_hf.bench.peer_export import write_calibration as write_samples


def write_calibration(out_dir: str | Path, count: int, seed: int = tasks.CALIBRATION_SEED) -> Path:
    """Write `count` bundled calibration samples and return the path of the .jsonl file."""
    return write_samples(tasks.calibration_samples(count, seed=seed), out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--seed", type=int, default=tasks.CALIBRATION_SEED)
    args = parser.parse_args()
    print(write_calibration(args.out_dir, args.count, args.seed))


if __name__ == "__main__":
    main()
