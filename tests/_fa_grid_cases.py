"""FlashAttention's grid of (query length, key length) pairs and head layouts (its
tests' practice, issue 28), shared by test_fa_grid.py and test_audit_28.py."""

SHAPES = [
    (1, 1),
    (239, 1),
    (3, 799),
    (127, 512),
    (113, 203),
    (128, 217),
    (108, 256),
    (1023, 1024),
    (1024, 1023),
]
HEADS = [(4, 4), (4, 2), (4, 1)]  # multi-head, grouped, multi-query
