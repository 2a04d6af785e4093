"""triton_bloom: Bloom embeddings for PyTorch, with Triton kernels.

``BloomEmbedding`` replaces ``nn.Embedding`` with a table ``compression_ratio``
times smaller: each id is hashed by ``k`` murmurhash3 functions (Spotlight's
seeds, bit for bit) and its vector is the sum of the ``k`` rows.
"""

from . import functional, optim
from .convert import BloomifyReport, bloomify
from .dispatch import TritonFallbackWarning, triton_available
from .hashing import SEEDS, bloom_hash
from .modules import (
    BloomEmbedding,
    BloomEmbeddingBag,
    ScaledEmbedding,
    ScaledEmbeddingBag,
    ZeroEmbedding,
    embedding_bytes,
)
from .optim import FusedRowWiseAdagrad, FusedSGD
from .output import (
    BloomOutputLayer,
    Ranks,
    TiedBloomLinear,
    TopK,
    bloom_cross_entropy,
    bloom_logits,
    bloom_rank,
    bloom_topk,
)
from .planner import Plan, plan_embedding
from .quantized import QuantizedBloomEmbedding, QuantizedBloomEmbeddingBag, quantize

__version__ = "0.1.0"

__all__ = [
    "SEEDS",
    "BloomEmbedding",
    "BloomEmbeddingBag",
    "FusedSGD",
    "FusedRowWiseAdagrad",
    "ScaledEmbedding",
    "ScaledEmbeddingBag",
    "ZeroEmbedding",
    "bloom_hash",
    "bloomify",
    "bloom_topk",
    "bloom_rank",
    "Ranks",
    "bloom_logits",
    "bloom_cross_entropy",
    "BloomOutputLayer",
    "TiedBloomLinear",
    "TopK",
    "embedding_bytes",
    "plan_embedding",
    "Plan",
    "BloomifyReport",
    "functional",
    "optim",
    "triton_available",
    "TritonFallbackWarning",
    "QuantizedBloomEmbedding",
    "QuantizedBloomEmbeddingBag",
    "quantize",
]
