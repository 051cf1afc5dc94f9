"""companion.torch.distributed: attention and shared weights across processes.

Built on PyTorch's own engine, ``torch.distributed`` (gloo on CPU processes, NCCL on
GPUs; no transport of our own):

* :func:`~companion.torch.distributed.launch.launch` starts the processes (or joins
  ``torchrun``'s);
* :func:`~companion.torch.distributed.ring.shard_sequence`,
  :func:`~companion.torch.distributed.ring.gather_sequence` and
  :func:`~companion.torch.distributed.ring.ring_attention` split a sequence over ranks
  (contiguous or zigzag) and attend over all of it;
* :class:`~companion.torch.distributed.tensor_parallel.TensorParallelMultiHeadAttention`
  splits a :class:`~companion.torch.multihead.MultiHeadAttention` by heads (Megatron);
* :mod:`companion.torch.distributed.data_parallel` trains with PyTorch's
  ``DistributedDataParallel`` and counts what it reduces;
* ``ulysses.ulysses_attention`` (sequence shards swapped to head shards by
  all-to-all), ``vocab_parallel.VocabParallelEmbedding`` (the vocabulary split, the
  tied output, the cross-entropy without gathering the logits),
  ``expert_parallel.ExpertParallelMoE`` (experts sharded, tokens sent by all-to-all)
  and ``pipeline.PipelineStageModule`` (a tied ``TinyTransformerLM`` cut into stages
  for ``torch.distributed.pipelining``, the embedding on the first and last stage);
* :mod:`companion.torch.distributed.fsdp` counts FSDP2's (``fully_shard``) all-gathers
  and reduce-scatters against their formula; :mod:`companion.torch.distributed.mesh`
  runs tensor x data parallelism on a 2-D ``DeviceMesh``;
  :mod:`companion.torch.distributed.bubbles` measures the pipeline schedules' bubble;
* :func:`~companion.torch.distributed.comm.counting` counts the bytes the package's
  calls send.

Import it explicitly (``import companion.torch.distributed``); ``companion.torch``
does not. Explained in the book chapter *Scaling out*.
"""

from companion.torch.distributed.comm import CommCount, counting
from companion.torch.distributed.expert_parallel import ExpertParallelMoE
from companion.torch.distributed.launch import (
    WorkerError,
    device,
    free_port,
    launch,
    under_torchrun,
)
from companion.torch.distributed.pipeline import (
    PipelineStageModule,
    stage_layers,
    sum_tied_gradients,
)
from companion.torch.distributed.ring import (
    LAYOUTS,
    RingAttentionFunction,
    gather_sequence,
    ring_attention,
    shard_positions,
    shard_sequence,
)
from companion.torch.distributed.tensor_parallel import (
    TensorParallelMultiHeadAttention,
    head_split,
)
from companion.torch.distributed.ulysses import ulysses_attention
from companion.torch.distributed.vocab_parallel import (
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "CommCount",
    "counting",
    "WorkerError",
    "device",
    "free_port",
    "launch",
    "under_torchrun",
    "LAYOUTS",
    "RingAttentionFunction",
    "gather_sequence",
    "ring_attention",
    "shard_positions",
    "shard_sequence",
    "TensorParallelMultiHeadAttention",
    "head_split",
    "ulysses_attention",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "ExpertParallelMoE",
    "PipelineStageModule",
    "stage_layers",
    "sum_tied_gradients",
]
