"""Bloom embeddings at the output: scoring every id of the catalogue.

A query ``q`` scores id ``i`` as ``q . v_i``, ``v_i`` the id's Bloom vector
(``sum_j f_j(i) W[h_j(i)]``, ``f_j`` its sign and importance factor), so the
score is ``sum_j f_j(i) (q . W[h_j(i)])``.  Everything here walks the
catalogue (or a candidate set) in chunks of ids and never holds more than a
chunk of vectors or of scores:

- :func:`bloom_topk` (``BloomEmbedding.topk``): the best ``k`` ids per
  query, ties broken by the smaller id, with per-query excluded ids;
- :func:`bloom_logits` (``BloomEmbedding.logits``): the tied output layer's
  logits, with gradients to the queries and to the table;
- :func:`bloom_cross_entropy`: the full-catalogue softmax loss without the
  ``batch x num_embeddings`` logits (an online log-sum-exp over chunks, the
  backward recomputing each chunk's logits), or a sampled softmax;
- :class:`BloomOutputLayer`: the paper's Bloom output layer (Serra &
  Karatzoglou 2017), a softmax over the ``num_rows`` units trained on the
  ``k`` hashed positions of the target, and its decoder.

On the Triton backend one kernel (``kernels/scores.py``) hashes, gathers and
takes the dot products of a chunk of ids with all queries; the PyTorch path
looks the chunk's vectors up with the embedding's own lookup and multiplies.
The table's gradient always goes through the lookup's own backward.

The package, by job: ``table`` (chunk sizes, the table as the scorer reads
it, the shared checks), ``walk`` (the top-k and rank drivers over chunks of
ids), ``retrieval`` (:func:`bloom_topk`, :func:`bloom_rank`), ``loss`` (the
tied logits and the fused loss), ``autograd`` (their passes over the
catalogue: custom ops for plain Bloom tables, so that ``torch.compile``
captures them in one graph) and ``layers`` (the two output layers).
"""

from .layers import BloomOutputLayer, TiedBloomLinear
from .loss import bloom_cross_entropy, bloom_logits
from .retrieval import bloom_rank, bloom_topk
from .table import default_chunk_size
from .walk import Ranks, TopK, rank_over_ids, topk_over_ids

__all__ = [
    "TopK",
    "Ranks",
    "bloom_topk",
    "bloom_rank",
    "bloom_logits",
    "bloom_cross_entropy",
    "BloomOutputLayer",
    "TiedBloomLinear",
    # The drivers under the functional forms, for any chunk scorer, and the
    # default chunk size.
    "topk_over_ids",
    "rank_over_ids",
    "default_chunk_size",
]
