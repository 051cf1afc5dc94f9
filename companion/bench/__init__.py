"""The benchmark behind the chapter *Making it fast*: ``python -m companion.bench``.

It measures, side by side in one run on the machine it runs on, attention (the textbook
line, the reference, the tiled kernels, torch's SDPA and the matrix-product bound),
the peak extra memory of each, convolution (loops, im2col, torch, TensorFlow) and
decoding with and without a KV cache, and prints ratios: absolute times vary between
machines, ratios measured in one run do not.

Importing this package loads nothing heavy; torch and TensorFlow are imported only by
the parts that measure them, and their columns are skipped, with a note, where they are
not installed. Run ``python -m companion.bench --help`` for the options, and
``python -m companion.bench crossover`` for the ``implementation="auto"`` threshold of
the machine it runs on.
"""
