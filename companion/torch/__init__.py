"""companion.torch: the same functions as :mod:`companion.numpy`, for torch tensors.

Works on any device and never leaves it (no ``.numpy()`` inside). Needs the ``torch``
extra: ``pip install "companion[torch]"``.
"""

# fail here, with torch's own message, if it is missing
import torch as _torch  # noqa: F401

from companion.torch.attention import *  # noqa: F401,F403

# Each topic module adds its names on a line of its own below.
from companion.torch.conv import *  # noqa: F401,F403
from companion.torch.cross_layer import *  # noqa: F401,F403
from companion.torch.latent import *  # noqa: F401,F403
from companion.torch.models import *  # noqa: F401,F403
from companion.torch.moe import *  # noqa: F401,F403
from companion.torch.multihead import *  # noqa: F401,F403
from companion.torch.paged import *  # noqa: F401,F403
from companion.torch.positions import *  # noqa: F401,F403
from companion.torch.quantized_cache import *  # noqa: F401,F403
from companion.torch.scores import *  # noqa: F401,F403
from companion.torch.seq2seq import *  # noqa: F401,F403
from companion.torch.sharing import *  # noqa: F401,F403
from companion.torch.sinks import *  # noqa: F401,F403
from companion.torch.source_cnn import *  # noqa: F401,F403
from companion.torch.vit import *  # noqa: F401,F403
