"""The second source document's Keras CNN, rebuilt in PyTorch (``NCHW``), layer for
layer.

The source builds, in Keras (input ``28 x 28 x 1``)::

    Conv2D(32, 3x3, relu) -> MaxPooling2D(2) -> Conv2D(64, 3x3, relu) -> MaxPooling2D(2)
    -> Flatten -> Dense(64, relu) -> Dense(10, softmax)

:class:`SourceCNN` is the same network in torch, with the same parameter count
(:func:`companion.params.count_parameters` of both agrees with
``model.count_params()``). Two differences are layouts, not arithmetic: torch images are
``NCHW`` and Keras images ``NHWC``, so ``Flatten`` orders the ``5 x 5 x 64`` features
differently; :meth:`SourceCNN.from_keras` copies a Keras model's weights in, permuting
the first dense layer's rows, so that both compute the same function.

Explained in the book chapter *Parameter sharing in code*.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["SourceCNN"]


class SourceCNN(nn.Module):
    """The source document's CNN: ``(B, 1, 28, 28)`` images -> ``(B, 10)`` class
    probabilities.

    Parameters
    ----------
    in_channels, image_size, num_classes : the source uses 1, 28 and 10
    """

    def __init__(
        self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10
    ):
        super().__init__()
        # shared 3x3 kernels, "valid"
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.pool = nn.MaxPool2d(2)  # no parameters
        # 28 -> 26 -> 13 -> 11 -> 5
        side = ((image_size - 2) // 2 - 2) // 2
        self.feature_side = side
        self.dense1 = nn.Linear(64 * side * side, 64)
        self.dense2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))  # (B, 32, 13, 13)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 64, 5, 5)
        # (B, 64 * 5 * 5), channel-major order
        x = torch.flatten(x, 1)
        x = torch.relu(self.dense1(x))  # (B, 64)
        return torch.softmax(self.dense2(x), dim=-1)  # (B, 10)

    @classmethod
    def from_keras(cls, model) -> "SourceCNN":
        """A :class:`SourceCNN` holding the weights of the source's Keras model (built).

        Conv kernels ``(kH, kW, C_in, C_out)`` become ``(C_out, C_in, kH, kW)``; dense
        kernels ``(in, out)`` become ``(out, in)``; the first dense layer's inputs are
        reordered from Keras's ``(h, w, c)`` flattening to torch's ``(c, h, w)``.
        """
        convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
        denses = [layer for layer in model.layers if type(layer).__name__ == "Dense"]
        if len(convs) != 2 or len(denses) != 2:
            raise ValueError(
                f"expected the source's 2 Conv2D and 2 Dense layers, got {len(convs)} "
                f"and {len(denses)}"
            )
        c_in = int(convs[0].kernel.shape[2])
        side = int(model.input_shape[1])
        twin = cls(
            in_channels=c_in,
            image_size=side,
            num_classes=int(denses[1].kernel.shape[1]),
        )
        s = twin.feature_side
        with torch.no_grad():
            # [book: keras to torch layouts]
            for conv, keras_conv in zip((twin.conv1, twin.conv2), convs):
                conv.weight.copy_(
                    torch.from_numpy(
                        np.asarray(keras_conv.kernel).transpose(3, 2, 0, 1).copy()
                    )
                )
                conv.bias.copy_(torch.from_numpy(np.asarray(keras_conv.bias)))
            # (s*s*64 in hwc order, 64)
            kernel = np.asarray(denses[0].kernel)
            # rows in chw order
            kernel = (
                kernel.reshape(s, s, 64, -1)
                .transpose(2, 0, 1, 3)
                .reshape(64 * s * s, -1)
            )
            twin.dense1.weight.copy_(torch.from_numpy(kernel.T.copy()))
            # [/book: keras to torch layouts]
            twin.dense1.bias.copy_(torch.from_numpy(np.asarray(denses[0].bias)))
            twin.dense2.weight.copy_(
                torch.from_numpy(np.asarray(denses[1].kernel).T.copy())
            )
            twin.dense2.bias.copy_(torch.from_numpy(np.asarray(denses[1].bias)))
        return twin
