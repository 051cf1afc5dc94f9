"""Fresh-process memory probe: ``python -m companion.bench.memprobe '<json request>'``.

Started by :func:`companion.bench.attention.framework_memory` with fixed malloc
thresholds; prints one JSON line ``{kind: {name: {n: bytes}}}`` on stdout.
"""

from __future__ import annotations

import json
import sys

from companion.bench.attention import probe

if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
