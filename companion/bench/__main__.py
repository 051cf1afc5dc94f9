"""``python -m companion.bench [--quick] [--json PATH] [--plot DIR]``.

See :mod:`companion.bench.cli`.
"""

from companion.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
