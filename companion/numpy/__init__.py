"""companion.numpy: the numpy implementations; the float64 references are the oracle.

Every public name here also exists, with the same signature, in
:mod:`companion.torch` and :mod:`companion.tensorflow`.
"""

# Each topic module adds its names on a line of its own below.
from companion.numpy.attention import *  # noqa: F401,F403
from companion.numpy.conv import *  # noqa: F401,F403
from companion.numpy.latent import *  # noqa: F401,F403
from companion.numpy.moe import *  # noqa: F401,F403
from companion.numpy.multihead import *  # noqa: F401,F403
from companion.numpy.paged import *  # noqa: F401,F403
from companion.numpy.positions import *  # noqa: F401,F403
from companion.numpy.quantized_cache import *  # noqa: F401,F403
from companion.numpy.scores import *  # noqa: F401,F403
from companion.numpy.sharing import *  # noqa: F401,F403
from companion.numpy.sinks import *  # noqa: F401,F403
