"""The code of the two source documents, verbatim, so that tests and the book run it as
written.

The book quotes these snippets, runs them, shows where they fail or mislead, and
corrects them with the package. Nothing here is edited: a change would hide the errors
the book documents (see the errata appendix). ``run_source`` executes one in a fresh
namespace.

Source 1: ``shared/seeds/000_f84334dcb9c313f5.txt`` (distance-based attention, a
shared matrix W).
Source 2: ``shared/seeds/001_407bd25bed854499.txt`` (convolution, dot-product attention,
Keras and PyTorch).
"""

from __future__ import annotations

__all__ = [
    "SOURCES",
    "SHARING_NUMPY",
    "ATTENTION_NUMPY",
    "KERAS_CNN",
    "TORCH_SELF_ATTENTION",
    "run_source",
]

# Source 1, section 4.1 参数共享
SHARING_NUMPY = """\
import numpy as np

# 定义共享参数矩阵
W = np.random.rand(10, 10)

# 定义神经网络部分
def forward(x, W):
    return np.dot(x, W) + np.random.rand(10)

# 训练过程
for i in range(1000):
    x = np.random.rand(10, 1)
    y = forward(x, W)
    W += 0.01 * (y - x)

# 预测过程
x = np.random.rand(10, 1)
y = forward(x, W)
"""

# Source 1, section 4.2 注意力机制
ATTENTION_NUMPY = """\
import numpy as np

# 输入序列
X = np.random.rand(10, 10)

# 计算相似度
def similarity(X):
    return 1 - np.linalg.norm(X)

# 软max归一化
def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum(axis=0)

# 注意力权重
def attention(X):
    a = softmax(similarity(X))
    alpha = np.dot(a, X)
    return alpha

# 预测过程
alpha = attention(X)
y = np.dot(alpha, X)
"""

# Source 2, section 4.1 参数共享：卷积神经网络
KERAS_CNN = """\
import tensorflow as tf

model = tf.keras.Sequential([
    tf.keras.layers.Conv2D(32, (3, 3), activation='relu', input_shape=(28, 28, 1)),
    tf.keras.layers.MaxPooling2D((2, 2)),
    tf.keras.layers.Conv2D(64, (3, 3), activation='relu'),
    tf.keras.layers.MaxPooling2D((2, 2)),
    tf.keras.layers.Flatten(),
    tf.keras.layers.Dense(64, activation='relu'),
    tf.keras.layers.Dense(10, activation='softmax')
])

model.compile(optimizer='adam', loss='sparse_categorical_crossentropy', metrics=['accuracy'])
"""

# Source 2, section 4.2 注意力机制：自注意力
TORCH_SELF_ATTENTION = """\
import torch
import torch.nn as nn

class SelfAttention(nn.Module):
    def __init__(self, d_model, nhead):
        super(SelfAttention, self).__init__()
        self.attention = nn.MultiheadAttention(d_model, nhead)

    def forward(self, x):
        return self.attention(x, x, x)

d_model = 64
nhead = 8
model = SelfAttention(d_model, nhead)
"""

SOURCES = {
    "sharing_numpy": SHARING_NUMPY,
    "attention_numpy": ATTENTION_NUMPY,
    "keras_cnn": KERAS_CNN,
    "torch_self_attention": TORCH_SELF_ATTENTION,
}


def run_source(name: str, namespace: dict | None = None) -> dict:
    """Execute source snippet ``name`` (a key of :data:`SOURCES`) and return its
    namespace.

    With ``namespace`` (a dict), the snippet runs *in* that dict, so that the caller can
    still inspect what it defined when it raises part way (source 1's sharing code
    defines ``W`` and ``forward`` and then fails in its training loop). Exceptions
    propagate unchanged: that is the point.
    """
    if name not in SOURCES:
        raise KeyError(f"no source snippet {name!r}; known: {', '.join(SOURCES)}")
    scope = {} if namespace is None else namespace
    scope.setdefault("__name__", f"companion.sources.{name}")
    exec(compile(SOURCES[name], f"<source: {name}>", "exec"), scope)
    return scope
