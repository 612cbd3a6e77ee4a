"""Run every benchmark module of this package (each `bench/<name>.py` with a `main()`), or the named ones.

    python -m bench                  # all of them, in name order
    python -m bench calibration      # just bench/calibration.py
    python -m bench calibration --quick   # options (words starting with -) go to each main()

Modules are imported only when they run, so one benchmark's heavy imports never slow another's.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def module_names() -> list[str]:
    return sorted(p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("_"))


def run(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")]
    options = [a for a in argv if a.startswith("-")]
    available = module_names()
    unknown = [n for n in names if n not in available]
    if unknown:
        print(
            f"unknown benchmark {', '.join(unknown)}; expected one of: {', '.join(available)}",
            file=sys.stderr,
        )
        return 2
    for name in names or available:
        module = importlib.import_module(f"bench.{name}")
        main = getattr(module, "main", None)
        if not callable(main):
            if names:
                print(f"bench/{name}.py has no main()", file=sys.stderr)
                return 2
            continue
        print(f"== bench {name} ==", flush=True)
        # Each main() parses its own options from sys.argv: give it only those.
        saved = sys.argv
        sys.argv = [f"bench.{name}", *options]
        try:
            main()
        finally:
            sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
