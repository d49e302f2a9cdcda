"""Rewrite the generated parts of the docs from the code: docs/config.md and the methods table.

    python scripts/regenerate_docs.py          # rewrite what is stale
    python scripts/regenerate_docs.py --check  # exit 1 if anything is stale (the tests check it too)

docs/config.md's ```text block is ``preftune.config.describe()``; docs/methods.md's table between the
``methods-table`` markers is ``preftune.losses.registry.methods_table()``. Everything around them is
hand-written and kept as it is.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from preftune.config import describe  # noqa: E402
from preftune.losses.registry import methods_table  # noqa: E402

CONFIG_BLOCK = re.compile(r"(```text\n)(.*?)(\n```)", re.S)
METHODS_BLOCK = re.compile(r"(<!-- methods-table:start[^\n]*-->\n)(.*?)(\n<!-- methods-table:end -->)", re.S)


def _replace(path: Path, pattern: re.Pattern[str], body: str) -> tuple[str, str]:
    text = path.read_text(encoding="utf-8")
    if len(pattern.findall(text)) != 1:
        raise SystemExit(
            f"{path.relative_to(ROOT)}: expected exactly one generated block ({pattern.pattern!r})"
        )
    return text, pattern.sub(lambda m: m.group(1) + body + m.group(3), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    stale = []
    for path, pattern, body in (
        (ROOT / "docs" / "config.md", CONFIG_BLOCK, describe()),
        (ROOT / "docs" / "methods.md", METHODS_BLOCK, methods_table()),
    ):
        old, new = _replace(path, pattern, body)
        if old != new:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new, encoding="utf-8")
    verb = "stale" if args.check else "rewritten"
    for path in stale:
        print(f"{path}: {verb}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
