"""companion.tensorflow: the same functions as :mod:`companion.numpy`, for TensorFlow
tensors.

TensorFlow prints C++ log lines on import that land in notebook outputs; they are
silenced here before it is imported (``setdefault``, so a user's own setting wins).
Needs the ``tf`` extra: ``pip install "companion[tf]"``.
"""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as _tf  # noqa: E402,F401

from companion.tensorflow.attention import *  # noqa: F401,F403

# Each topic module adds its names on a line of its own below.
from companion.tensorflow.conv import *  # noqa: F401,F403
from companion.tensorflow.moe import *  # noqa: F401,F403
from companion.tensorflow.multihead import *  # noqa: F401,F403
from companion.tensorflow.paged import *  # noqa: F401,F403
from companion.tensorflow.positions import *  # noqa: F401,F403
from companion.tensorflow.quantized_cache import *  # noqa: F401,F403
from companion.tensorflow.scores import *  # noqa: F401,F403
from companion.tensorflow.seq2seq import *  # noqa: F401,F403
from companion.tensorflow.sharing import *  # noqa: F401,F403
from companion.tensorflow.sinks import *  # noqa: F401,F403
