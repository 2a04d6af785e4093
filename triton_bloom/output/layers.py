"""The output layers: :class:`TiedBloomLinear` (logits over a shared Bloom
embedding's vectors) and :class:`BloomOutputLayer` (the paper's Bloom
output layer, a softmax over the hashed units, and its decoder)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dispatch
from ..hashing import WIDE_ID_START, check_num_hash_functions, hash_rows, seed_tensor
from ..layout import compressed_rows
from .loss import bloom_cross_entropy, bloom_logits
from .retrieval import bloom_topk
from .table import _acc_dtype, _check_ids, _check_targets, _id_dtype
from .walk import Ranks, TopK, rank_over_ids, topk_over_ids


class TiedBloomLinear(nn.Module):
    r"""An output layer tied to a Bloom embedding: ``hidden @ V^T + bias``
    over every id, where ``V`` are the embedding's vectors (what
    :func:`~triton_bloom.bloomify` puts in place of an ``nn.Linear`` whose
    weight was tied to a converted embedding).  The table is shared, not
    copied: training either end trains both.

    The embedding is a submodule (``head.embedding``), so ``.to()``,
    ``.cuda()``, ``.half()`` and ``parameters()`` on the head alone reach the
    table.  In a model that holds the same embedding elsewhere too,
    ``parameters()``, ``buffers()`` and ``modules()`` list it once, as for
    any shared submodule, and ``state_dict()`` keeps the table under the
    embedding's own keys only (where the embedding comes first in the model;
    otherwise both keys name the one tensor, saved once by ``torch.save``).
    Loading fills the head's table keys from the embedding's when they are
    absent.

    Args:
        embedding (BloomEmbedding): the shared table.
        bias (Tensor, optional): ``(num_embeddings,)`` bias, kept as a parameter.

    Shape:
        - Input: :math:`(*, H)`; output: :math:`(*, N)`.

    Examples::

        >>> emb = BloomEmbedding(10_000, 32, padding_idx=None)
        >>> head = TiedBloomLinear(emb, torch.zeros(10_000))
        >>> head(torch.randn(4, 32)).shape
        torch.Size([4, 10000])
        >>> model = nn.ModuleDict({"emb": emb, "head": head})
        >>> sum(p.numel() for p in model.parameters()) == emb.weight.numel() + 10_000
        True
    """

    def __init__(self, embedding, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.embedding = embedding
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings
        self.register_state_dict_post_hook(_drop_shared_table)
        self.register_load_state_dict_pre_hook(_fill_shared_table)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = bloom_logits(hidden, self.embedding)
        return logits if self.bias is None else logits + self.bias

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
        """``F.cross_entropy(self(hidden), targets)`` without the logits:
        :func:`bloom_cross_entropy` with this layer's bias (same keyword arguments)."""
        return bloom_cross_entropy(hidden, targets, self.embedding, bias=self.bias, **kwargs)

    def topk(self, hidden: torch.Tensor, k: int, **kwargs) -> TopK:
        """The ``k`` ids with the highest logits per row of ``hidden`` ``(Q, H)``:
        :func:`bloom_topk` with this layer's bias (same keyword arguments)."""
        return bloom_topk(hidden, self.embedding, k, bias=self.bias, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _same_tensor(a, b) -> bool:
    """Whether two state-dict values are views of the same memory (a
    parameter and its ``detach()`` are); never for tensors without storage."""
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() != 0
        and a.data_ptr() == b.data_ptr()
    )


def _drop_shared_table(module, state_dict, prefix, local_metadata) -> None:
    # nn.Module's state_dict does not skip a shared submodule as parameters()
    # does: where the embedding was saved already, under its owner's keys,
    # the head's copy of those keys goes.
    own = prefix + "embedding."
    weight = state_dict.get(own + "embeddings.weight")
    if weight is None or not any(
        not key.startswith(own) and _same_tensor(value, weight) for key, value in state_dict.items()
    ):
        return
    for key in [key for key in state_dict if key.startswith(own)]:
        del state_dict[key]


def _fill_shared_table(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    # A state dict saved with the table under the embedding's keys only (see
    # _drop_shared_table) loads the table there; the head's keys then take
    # the table as it is, so that strict loading does not miss them.
    own = prefix + "embedding."
    if any(key.startswith(own) for key in state_dict):
        return
    state_dict.update(module.embedding.state_dict(prefix=own, keep_vars=False))


class BloomOutputLayer(nn.Module):
    r"""The Bloom output layer of Serra & Karatzoglou (RecSys 2017): a softmax
    over ``num_rows`` output units instead of ``num_embeddings``, trained
    with the ``k`` hashed positions of the target as the label, and decoded
    by scoring each id with the sum of the log-probabilities at its ``k``
    positions.

    Args:
        in_features (int): size of the hidden state.
        num_embeddings (int): the id space ``[0, num_embeddings)``.
        compression_ratio (float): ``int(compression_ratio * num_embeddings)``
            output units. Default: 0.2.
        num_hash_functions (int): ``k``, 1 to 24. Default: 4.
        num_rows (int, optional): the output units, overriding ``compression_ratio``.
        bias (bool): of the projection. Default: ``True``.
        backend (str): ``"auto"``, ``"triton"`` or ``"torch"``, for the decoder.
        device (torch.device, optional): of the projection.
        dtype (torch.dtype, optional): of the projection.

    Shape:
        - Input: :math:`(*, H_{in})`; ``forward`` gives :math:`(*, R)`
          log-probabilities over the ``R = num_rows`` units.

    Examples::

        >>> layer = BloomOutputLayer(64, 1_000_000, compression_ratio=0.2)
        >>> hidden = torch.randn(8, 64)
        >>> layer.loss(hidden, torch.randint(0, 1_000_000, (8,))).backward()
        >>> layer.topk(hidden, 10).ids.shape
        torch.Size([8, 10])
    """

    def __init__(
        self,
        in_features: int,
        num_embeddings: int,
        compression_ratio: float = 0.2,
        num_hash_functions: int = 4,
        *,
        num_rows: Optional[int] = None,
        bias: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_num_hash_functions(num_hash_functions)
        if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int) or num_embeddings < 1:
            raise ValueError(f"num_embeddings must be a positive int, got {num_embeddings!r}")
        self.num_embeddings = num_embeddings
        self.num_hash_functions = num_hash_functions
        self.num_rows = compressed_rows(num_embeddings, compression_ratio, num_rows)
        self.backend = dispatch.check_backend(backend)
        self.projection = nn.Linear(in_features, self.num_rows, bias=bias, device=device, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.projection(hidden), dim=-1)

    def target_rows(self, targets: torch.Tensor) -> torch.Tensor:
        """``(*, k)`` int64 output units of each target id."""
        _check_ids(targets, "targets", self.num_embeddings, allow_missing=False)
        # In range, every id fits the narrowest id type, whose hash needs no
        # test of the values for 8-byte ids (a graph break under torch.compile).
        ids = targets.to(_id_dtype(self.num_embeddings))
        return hash_rows(ids, self.num_hash_functions, self.num_rows).to(torch.int64)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy against the target's Bloom code: ``-mean_j log p[h_j(target)]``
        (the label puts ``1/k`` on each of the ``k`` units; a unit hit twice
        counts twice)."""
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        losses = -self(hidden).gather(-1, self.target_rows(targets)).mean(-1)
        return losses if reduction == "none" else losses.sum() if reduction == "sum" else losses.mean()

    def scores(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``(Q, C)``: each id's score for each row of ``hidden`` ``(Q, H)``:
        the sum of the log-probabilities at its ``k`` units (no gradient is
        needed for ranking, but this one is differentiable)."""
        rows = self.target_rows(ids.reshape(-1))
        return self(hidden)[:, rows].sum(-1)

    def topk(
        self,
        hidden: torch.Tensor,
        k: int,
        *,
        candidates: Optional[torch.Tensor] = None,
        exclude: Optional[torch.Tensor] = None,
        chunk_size: Optional[int] = None,
    ) -> TopK:
        """The decoder: the ``k`` ids with the highest sum of log-probabilities
        at their ``k`` units, for each row of ``hidden`` ``(Q, H)``; the same
        arguments and result as :func:`bloom_topk`.  On the Triton backend
        the hashing, gathering and summing are one kernel per chunk."""
        log_probs, score_chunk, acc = self._decoder(hidden)
        k_hash, rows_total = self.num_hash_functions, self.num_rows

        def score_rows(ids):
            rows = hash_rows(ids, k_hash, rows_total).to(torch.int64)  # (Q, C, k)
            return log_probs.gather(1, rows.reshape(ids.shape[0], -1)).view(rows.shape).to(acc).sum(-1)

        return topk_over_ids(
            score_chunk,
            hidden.shape[0],
            k,
            num_embeddings=self.num_embeddings,
            device=hidden.device,
            dtype=acc,
            candidates=candidates,
            exclude=exclude,
            chunk_size=chunk_size,
            score_rows=score_rows,
        )

    def rank(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        *,
        exclude: Optional[torch.Tensor] = None,
        chunk_size: Optional[int] = None,
    ) -> Ranks:
        """Where each row's target ranks by the decoder's score (the sum of
        the log-probabilities at an id's ``k`` units) among every id: the
        same arguments and result as :func:`bloom_rank`."""
        log_probs, score_chunk, _ = self._decoder(hidden)
        targets = _check_targets(targets, hidden.shape[0], self.num_embeddings, None, hidden.device)
        return rank_over_ids(
            score_chunk,
            targets,
            num_embeddings=self.num_embeddings,
            device=hidden.device,
            exclude=exclude,
            chunk_size=chunk_size,
        )

    def _decoder(self, hidden):
        """The ``(Q, num_rows)`` log-probabilities (the layer's dtype: a half
        precision copy is half the bytes), the ``(C,)`` ids -> ``(Q, C)``
        decoder scores function (one kernel per chunk on the Triton backend)
        and the dtype its sums run in (float32, or float64)."""
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
            raise ValueError(
                f"hidden must be a 2-D (num_queries, in_features) Tensor, got {getattr(hidden, 'shape', hidden)}"
            )
        with torch.no_grad():
            log_probs = self(hidden)
        acc = _acc_dtype(log_probs.dtype)
        use_triton = dispatch.use_triton(self.backend, log_probs.device)

        def score_chunk(ids):
            if use_triton:
                return dispatch.kernels().bloom_row_score_sums(
                    log_probs,
                    ids,
                    seed_tensor(ids.device),
                    num_hash_functions=self.num_hash_functions,
                    wide_ids=self.num_embeddings > WIDE_ID_START,
                )
            rows = hash_rows(ids, self.num_hash_functions, self.num_rows).to(torch.int64)
            return log_probs[:, rows].to(acc).sum(-1)

        return log_probs, score_chunk, acc

    def extra_repr(self) -> str:
        return (
            f"{self.projection.in_features}, {self.num_embeddings}, num_rows={self.num_rows}, "
            f"num_hash_functions={self.num_hash_functions}"
        )
