"""Baselines the benchmarks compare against.

``SpotlightBloomEmbedding`` computes what Spotlight's ``BloomEmbedding``
(``spotlight/layers.py``, the project's seed, not part of this repository)
computes, the way it computes it: a hash table of every id built once with
scikit-learn, the padding id's hashes forced to row 0 of an ``nn.Embedding``
whose padding row is frozen, then per batch an ``index_select`` of the
hashes, a gather of ``(n, k, dim)`` rows and a sum over ``k``.  It is
re-derived from the seed's description, not copied, and
``tests/test_spotlight.py`` holds our module to it.
"""

import numpy as np
import torch
import torch.nn as nn

# Spotlight's seeds, as its layers.py lists them.
SPOTLIGHT_SEEDS = [
    179424941,
    179425457,
    179425907,
    179426369,
    179424977,
    179425517,
    179425943,
    179426407,
    179424989,
    179425529,
    179425993,
    179426447,
    179425003,
    179425537,
    179426003,
    179426453,
    179425019,
    179425559,
    179426029,
    179426491,
    179425027,
    179425579,
    179426081,
    179426549,
]


class SpotlightBloomEmbedding(nn.Module):
    """Spotlight's BloomEmbedding (``bag=False``), for comparisons."""

    def __init__(self, num_embeddings, embedding_dim, compression_ratio=0.2, num_hash_functions=4, padding_idx=0):
        super().__init__()
        from sklearn.utils import murmurhash3_32

        num_rows = int(compression_ratio * num_embeddings)
        self.embeddings = nn.Embedding(num_rows, embedding_dim, padding_idx=padding_idx)
        with torch.no_grad():
            self.embeddings.weight.normal_(0, 1.0 / embedding_dim)
            self.embeddings.weight[padding_idx].fill_(0)
        ids = np.arange(num_embeddings, dtype=np.int32)
        columns = []
        for seed in SPOTLIGHT_SEEDS[:num_hash_functions]:
            hashed = murmurhash3_32(ids, seed=seed)
            hashed[padding_idx] = 0
            columns.append(hashed % num_rows)
        self.hashes = torch.from_numpy(np.stack(columns, axis=1).astype(np.int64))

    def forward(self, indices):
        batch = indices.size(0)
        seq = indices.size(1) if indices.dim() == 2 else 1
        if self.hashes.device != indices.device:
            self.hashes = self.hashes.to(indices.device)
        hashed = torch.index_select(self.hashes, 0, indices.reshape(-1))
        return self.embeddings(hashed).sum(1).view(batch, seq, -1)
