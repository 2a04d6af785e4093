"""The differentiable passes over the catalogue behind :func:`bloom_logits`
and :func:`bloom_cross_entropy`: the logits, chunk by chunk, and the online
log-sum-exp, each with a backward that recomputes a chunk's logits at a time.

For a Bloom table whose options the lookup's custom op takes (every plain
:class:`~triton_bloom.BloomEmbedding`: no hash cache, no private part) the
passes are ``torch.library`` custom ops, with fake implementations and
their backward registered, like the lookups, so that ``torch.compile``
traces them whole (``fullgraph=True``); the table's gradient is the
lookup's own backward op.  Any other module (an ``nn.Embedding`` baseline,
a variant the ops do not take) runs the same loops in an
``autograd.Function`` through the module's forward and autograd; there
``torch.compile`` breaks the graph.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .. import dispatch, ops
from .table import _acc_dtype, _chunks, _id_range, _Table


class _TensorTable(_Table):
    """A plain Bloom table given as its tensors and options (inside the
    custom ops, which take no modules): the same scores as the module's
    ``_Table``, its vectors from the lookup's forward op and their gradient
    from the lookup's backward op, without autograd."""

    def __init__(self, weight, importance, hot, num_hash_functions, padding_idx, num_embeddings, signed, backend):
        # No module behind it: _Table's constructor reads one, so it is not called.
        self.emb = None
        self.weight = weight
        self.options = dict(
            num_hash_functions=num_hash_functions,
            padding_idx=padding_idx,
            num_embeddings=num_embeddings,
            signed=signed,
            importance=importance,
            hot=hot,
        )
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, weight.shape[1], padding_idx
        self.use_triton = dispatch.use_triton(backend, weight.device)
        self.plain = True
        self.kernel = self.use_triton
        self.quantized_kernel = False  # a float table: quantized ones take no gradient, so never come here
        self.reference = not self.use_triton and hot is None
        self._params = [weight] + ([importance] if importance is not None else [])

    def parameters(self):
        return self._params

    def _lookup(self):
        options = self.options
        return dict(
            num_hash_functions=options["num_hash_functions"],
            padding_idx=options["padding_idx"],
            num_embeddings=options["num_embeddings"],
            signed=options["signed"],
            use_triton=self.use_triton,
        )

    def vectors(self, ids):
        options = self.options
        return ops.bloom_forward(ids, self.weight, options["importance"], options["hot"], None, None, **self._lookup())

    def vectors_for_grad(self, ids, wanted):
        options = self.options

        def pull(grad):
            grad_weight, grad_importance = ops.bloom_backward(
                grad, ids, self.weight, options["importance"], options["hot"], None, **self._lookup()
            )
            return [grad_weight if p is self.weight else grad_importance for p in wanted]

        return self.vectors(ids), pull


def _op_options(table) -> dict:
    """The custom ops' scalar arguments for a module's plain table."""
    options = table.options
    return dict(
        num_hash_functions=options["num_hash_functions"],
        padding_idx=options["padding_idx"],
        num_embeddings=table.num_embeddings,
        signed=options["signed"],
        backend=options["backend"],
    )


def _catalogue_backward(table, hidden, bias, chunk, needs, grad_of_chunk):
    """Gradients of ``sum(G * (hidden @ V^T + bias))`` over the catalogue,
    chunk by chunk, where ``G[:, s:e] = grad_of_chunk(s, e, logits)``
    (``logits`` the chunk's, recomputed): ``grad_hidden``, ``grad_bias`` and
    one per ``table.parameters()``.  The table's part goes through the
    lookup's own backward (``table.vectors_for_grad``)."""
    params = table.parameters()
    acc = _acc_dtype(hidden.dtype, table.weight.dtype)
    hid = hidden.to(acc)
    need_h, need_b, need_p = needs[0], needs[1], needs[2:]
    wanted = [p for p, need in zip(params, need_p) if need]
    grad_h = torch.zeros_like(hid) if need_h else None
    grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
    totals = [torch.zeros(p.shape, dtype=_acc_dtype(p.dtype), device=p.device) for p in wanted]
    for s, e in _chunks(table.num_embeddings, chunk):
        vectors, pull = table.vectors_for_grad(_id_range(s, e, table.num_embeddings, hidden.device), wanted)
        v = vectors.detach().to(acc)
        logits = hid @ v.T
        if bias is not None:
            logits += bias[s:e].to(acc)
        grad = grad_of_chunk(s, e, logits)
        if need_h:
            grad_h.addmm_(grad, v)
        if need_b:
            grad_b[s:e] = grad.sum(0)
        if wanted:
            for total, g in zip(totals, pull((grad.T @ hid).to(vectors.dtype))):
                if g is not None:
                    total += g.to(total.dtype)
    grads = iter(total.to(p.dtype) for total, p in zip(totals, wanted))
    return (
        grad_h.to(hidden.dtype) if need_h else None,
        grad_b.to(bias.dtype) if need_b else None,
        *(next(grads) if need else None for need in need_p),
    )


def _logits_forward(table, hidden, chunk):
    out = torch.empty(
        (hidden.shape[0], table.num_embeddings),
        device=hidden.device,
        dtype=torch.promote_types(hidden.dtype, table.weight.dtype),
    )
    for s, e in _chunks(table.num_embeddings, chunk):
        out[:, s:e] = table.scores(hidden, _id_range(s, e, table.num_embeddings, hidden.device))
    return out


def _logits_backward(table, hidden, chunk, grad_out, needs):
    acc = _acc_dtype(hidden.dtype, table.weight.dtype)
    return _catalogue_backward(
        table, hidden, None, chunk, (needs[0], False, *needs[1:]), lambda s, e, logits: grad_out[:, s:e].to(acc)
    )


def _lse_forward(table, hidden, bias, chunk):
    acc = _acc_dtype(hidden.dtype, table.weight.dtype)
    lse = torch.full((hidden.shape[0],), float("-inf"), dtype=acc, device=hidden.device)
    for s, e in _chunks(table.num_embeddings, chunk):
        logits = table.scores(hidden, _id_range(s, e, table.num_embeddings, hidden.device))
        if bias is not None:
            logits += bias[s:e].to(acc)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, 1))
    return lse


def _lse_backward(table, hidden, bias, chunk, lse, grad_lse, needs):
    g, lse = grad_lse.to(lse.dtype).unsqueeze(1), lse.unsqueeze(1)

    def softmax_grad(s, e, logits):
        return logits.sub_(lse).exp_().mul_(g)

    return _catalogue_backward(table, hidden, bias, chunk, needs, softmax_grad)


# Any embedding-like module: autograd.Functions over the module. -------------------


class _Logits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, table, chunk, *params):
        ctx.save_for_backward(hidden)
        ctx.table, ctx.chunk = table, chunk
        return _logits_forward(table, hidden, chunk)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (hidden,) = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:])
        grads = _logits_backward(ctx.table, hidden, ctx.chunk, grad_out, needs)
        return grads[0], None, None, *grads[2:]


class _LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, bias, table, chunk, *params):
        lse = _lse_forward(table, hidden, bias, chunk)
        ctx.save_for_backward(hidden, bias, lse)
        ctx.table, ctx.chunk = table, chunk
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse):
        hidden, bias, lse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], *ctx.needs_input_grad[4:])
        grads = _lse_backward(ctx.table, hidden, bias, ctx.chunk, lse, grad_lse, needs)
        return grads[0], grads[1], None, None, *grads[2:]


# Plain Bloom tables: custom ops. -------------------------------------------------
# A custom op returns tensors, never None: a gradient not asked for is an
# empty tensor, and the autograd formula hands back None for it.


def _or_empty(grads, like):
    return [g if g is not None else like.new_empty((0,)) for g in grads]


def _fake_grads(like, needs, tensors):
    return [torch.empty_like(t) if need and t is not None else like.new_empty((0,)) for t, need in zip(tensors, needs)]


@torch.library.custom_op("triton_bloom::catalogue_logits", mutates_args=())
def catalogue_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    *,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: int,
    signed: bool,
    backend: str,
    chunk: int,
) -> torch.Tensor:
    """``(Q, num_embeddings)`` logits ``hidden @ V^T`` of a plain Bloom
    table, a chunk of ids at a time (:func:`bloom_logits`)."""
    table = _TensorTable(weight, importance, hot, num_hash_functions, padding_idx, num_embeddings, signed, backend)
    return _logits_forward(table, hidden, chunk)


@catalogue_logits.register_fake
def _(hidden, weight, importance, hot, *, num_embeddings, **options):
    return hidden.new_empty((hidden.shape[0], num_embeddings), dtype=torch.promote_types(hidden.dtype, weight.dtype))


@torch.library.custom_op("triton_bloom::catalogue_logits_backward", mutates_args=())
def catalogue_logits_backward(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    *,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: int,
    signed: bool,
    backend: str,
    chunk: int,
    needs: list[bool],
) -> list[torch.Tensor]:
    """The gradients of :func:`catalogue_logits` for ``hidden``, ``weight``
    and ``importance`` where ``needs`` asks for them (else empty)."""
    table = _TensorTable(weight, importance, hot, num_hash_functions, padding_idx, num_embeddings, signed, backend)
    needs = needs[:2] + (needs[2:] if importance is not None else [])
    grads = _logits_backward(table, hidden, chunk, grad_out, needs)
    grads = [grads[0], *grads[2:]]
    return _or_empty(grads + [None] * (3 - len(grads)), hidden)


@catalogue_logits_backward.register_fake
def _(grad_out, hidden, weight, importance, hot, *, needs, **options):
    return _fake_grads(hidden, needs, (hidden, weight, importance))


def _logits_setup(ctx, inputs, keyword_only_inputs, output):
    hidden, weight, importance, hot = inputs
    ctx.options = keyword_only_inputs
    ctx.save_for_backward(hidden, weight, importance, hot)


def _logits_formula(ctx, grad_out):
    hidden, weight, importance, hot = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], importance is not None and ctx.needs_input_grad[2]]
    grads = catalogue_logits_backward(grad_out, hidden, weight, importance, hot, **ctx.options, needs=needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None)


catalogue_logits.register_autograd(_logits_formula, setup_context=_logits_setup)


@torch.library.custom_op("triton_bloom::catalogue_logsumexp", mutates_args=())
def catalogue_logsumexp(
    hidden: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight: torch.Tensor,
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    *,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: int,
    signed: bool,
    backend: str,
    chunk: int,
) -> torch.Tensor:
    """``(Q,)`` ``logsumexp(hidden @ V^T + bias, 1)`` over a plain Bloom
    table's catalogue, online over chunks of ids (:func:`bloom_cross_entropy`),
    in float32 (float64 for float64 ``hidden`` or tables)."""
    table = _TensorTable(weight, importance, hot, num_hash_functions, padding_idx, num_embeddings, signed, backend)
    return _lse_forward(table, hidden, bias, chunk)


@catalogue_logsumexp.register_fake
def _(hidden, bias, weight, importance, hot, **options):
    return hidden.new_empty((hidden.shape[0],), dtype=_acc_dtype(hidden.dtype, weight.dtype))


@torch.library.custom_op("triton_bloom::catalogue_logsumexp_backward", mutates_args=())
def catalogue_logsumexp_backward(
    grad_lse: torch.Tensor,
    lse: torch.Tensor,
    hidden: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight: torch.Tensor,
    importance: Optional[torch.Tensor],
    hot: Optional[torch.Tensor],
    *,
    num_hash_functions: int,
    padding_idx: Optional[int],
    num_embeddings: int,
    signed: bool,
    backend: str,
    chunk: int,
    needs: list[bool],
) -> list[torch.Tensor]:
    """The gradients of :func:`catalogue_logsumexp` for ``hidden``, ``bias``,
    ``weight`` and ``importance`` where ``needs`` asks for them (else empty)."""
    table = _TensorTable(weight, importance, hot, num_hash_functions, padding_idx, num_embeddings, signed, backend)
    needs = [needs[0], needs[1] and bias is not None, needs[2]] + ([needs[3]] if importance is not None else [])
    grads = list(_lse_backward(table, hidden, bias, chunk, lse, grad_lse, needs))
    return _or_empty(grads + [None] * (4 - len(grads)), hidden)


@catalogue_logsumexp_backward.register_fake
def _(grad_lse, lse, hidden, bias, weight, importance, hot, *, needs, **options):
    return _fake_grads(hidden, needs, (hidden, bias, weight, importance))


def _lse_setup(ctx, inputs, keyword_only_inputs, output):
    hidden, bias, weight, importance, hot = inputs
    ctx.options = keyword_only_inputs
    ctx.save_for_backward(hidden, bias, weight, importance, hot, output)


def _lse_formula(ctx, grad_lse):
    hidden, bias, weight, importance, hot, lse = ctx.saved_tensors
    needs = [
        ctx.needs_input_grad[0],
        bias is not None and ctx.needs_input_grad[1],
        ctx.needs_input_grad[2],
        importance is not None and ctx.needs_input_grad[3],
    ]
    grads = catalogue_logsumexp_backward(
        grad_lse, lse, hidden, bias, weight, importance, hot, **ctx.options, needs=needs
    )
    return (*(g if need else None for g, need in zip(grads, needs)), None)


catalogue_logsumexp.register_autograd(_lse_formula, setup_context=_lse_setup)


def plain_tensors(table) -> tuple:
    """``(weight, importance, hot)`` of a module's plain table, for the ops."""
    return table.weight, table.options.get("importance"), table.options.get("hot")
