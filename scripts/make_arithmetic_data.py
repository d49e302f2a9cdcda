#!/usr/bin/env python
"""Write the bundled arithmetic preference data (train.jsonl, test.jsonl).

    python scripts/make_arithmetic_data.py            # regenerate src/preftune/resources/arithmetic/
    python scripts/make_arithmetic_data.py --check    # exit 1 if the committed files are out of date

Everything comes from preftune.data.arithmetic with its fixed seed, so running this twice gives the
same bytes. tests/test_arithmetic_data.py fails if the committed files drift from the generator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from preftune.data.arithmetic import DEFAULT_SEED, TEST_SIZE, TRAIN_SIZE, generate_splits, to_jsonl

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "preftune" / "resources" / "arithmetic"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--train", type=int, default=TRAIN_SIZE, help="number of training pairs")
    parser.add_argument("--test", type=int, default=TEST_SIZE, help="number of held-out pairs")
    parser.add_argument(
        "--check", action="store_true", help="compare with the files in --out instead of writing"
    )
    args = parser.parse_args(argv)

    splits = generate_splits(args.seed, n_train=args.train, n_test=args.test)
    stale = []
    for split, records in splits.items():
        path = args.out / f"{split}.jsonl"
        text = to_jsonl(records)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({len(records)} pairs, {len(text.encode())} bytes)")
    if stale:
        print(
            "out of date: " + ", ".join(stale) + "\nrun: python scripts/make_arithmetic_data.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
