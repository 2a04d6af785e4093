"""The seed's plain tables (Spotlight's ``layers.py``): ``ScaledEmbedding``,
``ZeroEmbedding`` and ``ScaledEmbeddingBag``, ``nn.Embedding`` and
``nn.EmbeddingBag`` with Spotlight's initialisation.  A Bloom module keeps
its compressed table in a ``ScaledEmbedding``; the planner builds one when
the full or a narrower table fits the budget."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ScaledEmbedding", "ZeroEmbedding", "ScaledEmbeddingBag"]


class ScaledEmbedding(nn.Embedding):
    r"""An :class:`torch.nn.Embedding` initialised from
    :math:`\mathcal{N}(0, 1/\text{embedding\_dim})` (standard deviation
    ``1 / embedding_dim``), as in Spotlight.  Takes ``nn.Embedding``'s arguments.

    Examples::

        >>> emb = ScaledEmbedding(10, 4, padding_idx=0)
        >>> emb(torch.tensor([0, 3])).shape
        torch.Size([2, 4])
    """

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0, 1.0 / self.embedding_dim)
            if self.padding_idx is not None:
                self.weight[self.padding_idx].fill_(0)


class ZeroEmbedding(nn.Embedding):
    r"""An :class:`torch.nn.Embedding` initialised to zeros, as Spotlight uses
    for biases.  Takes ``nn.Embedding``'s arguments.

    Examples::

        >>> bias = ZeroEmbedding(10, 1)
        >>> bias(torch.tensor([3])).sum().item()
        0.0
    """

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()


class ScaledEmbeddingBag(nn.EmbeddingBag):
    r"""An :class:`torch.nn.EmbeddingBag` initialised from
    :math:`\mathcal{N}(0, 1/\text{embedding\_dim})`, as in Spotlight.  Takes
    ``nn.EmbeddingBag``'s arguments.

    Examples::

        >>> bag = ScaledEmbeddingBag(10, 4, mode="sum")
        >>> bag(torch.tensor([[1, 2], [3, 4]])).shape
        torch.Size([2, 4])
    """

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0, 1.0 / self.embedding_dim)
            if self.padding_idx is not None:
                self.weight[self.padding_idx].fill_(0)
