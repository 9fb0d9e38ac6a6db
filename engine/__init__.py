"""The engine: one network serving many streams, behind a seam any network backend implements.

``Engine`` runs the adapters of ``adapters/`` on a :class:`~engine.network.Network`: a PyTorch
module (:class:`~engine.torch_backend.TorchNetwork`) or an ONNX file
(:class:`~engine.onnx_backend.OnnxNetwork`, imported from its module: it needs onnxruntime).
"""

from engine.core import Engine, ForwardResult, ImportedState, PoolKey, StreamHandle
from engine.network import Network, NormLayer, Statistics
from engine.torch_backend import TorchNetwork

__all__ = [
    "Engine",
    "ForwardResult",
    "ImportedState",
    "Network",
    "NormLayer",
    "PoolKey",
    "Statistics",
    "StreamHandle",
    "TorchNetwork",
]
