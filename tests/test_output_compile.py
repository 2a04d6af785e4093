"""``torch.compile(fullgraph=True)`` over the output side: the fused loss,
the tied logits, ``TiedBloomLinear`` and ``BloomOutputLayer``, against eager
mode (values and every gradient), in one graph; and ``torch.library.opcheck``
on the output side's custom ops.

Before these ops the catalogue passes were ``autograd.Function``s over a
Python table object, whose backward called ``torch.autograd.grad``, and the
target check read tensor values: ``fullgraph=True`` failed on all four
(a data-dependent guard in the check, ``torch.autograd.grad`` untraceable
in the backward, the 8-byte-id branch of the hash in the layer's loss).

``backend="aot_eager"``, as in tests/test_compile.py: Dynamo's capture and
AOTAutograd's joint trace, which is what a graph break or a wrong fake
implementation trips, without Inductor's slow C++ builds on a 2-core CPU.
"""

import pytest
import torch
from support import DEVICE, require_kernels

from triton_bloom import BloomEmbedding, BloomOutputLayer, TiedBloomLinear, bloom_cross_entropy, bloom_logits
from triton_bloom.output import autograd as output_ops

NUM, DIM = 70, 6


class CountingBackend:
    """Counts the graphs it is handed (one per compiled frame, so a graph
    break shows as a second one) and passes them on to ``aot_eager``."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def compiled(fn):
    torch._dynamo.reset()
    counter = CountingBackend()
    return torch.compile(fn, fullgraph=True, backend=counter), counter


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    if request.param == "triton":
        require_kernels()
    return request.param


def make_head(backend, seed, *, signed, importance, padding_idx, bias, dtype=torch.float32):
    torch.manual_seed(seed)
    emb = BloomEmbedding(
        NUM,
        DIM,
        num_rows=13,
        num_hash_functions=3,
        padding_idx=padding_idx,
        signed=signed,
        importance=importance,
        backend=backend,
        device=DEVICE,
        dtype=dtype,
    )
    if importance:
        with torch.no_grad():
            emb.importance_weight.uniform_(0.5, 1.5)
    return TiedBloomLinear(emb, torch.randn(NUM, device=DEVICE, dtype=dtype) if bias else None)


def run_and_grads(fn, params, *args):
    for p in params:
        p.grad = None
    out = fn(*args)
    out.sum().backward()
    return out.detach(), [None if p.grad is None else p.grad.clone() for p in params]


def assert_same(eager, comp, names):
    torch.testing.assert_close(comp[0], eager[0], rtol=1e-5, atol=1e-6)
    for name, a, b in zip(names, comp[1], eager[1]):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


CASES = [
    dict(signed=False, importance=False, padding_idx=None, bias=False),
    dict(signed=True, importance=True, padding_idx=0, bias=True),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_loss_fullgraph_matches_eager(backend, case, reduction):
    head = make_head(backend, 1, **case)
    emb = head.embedding
    hidden = torch.randn(5, DIM, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, NUM, (5,), device=DEVICE)
    targets[1] = -100  # ignored

    def loss(hidden, targets):
        return bloom_cross_entropy(hidden, targets, emb, bias=head.bias, reduction=reduction, chunk_size=16)

    params = [hidden, emb.weight, emb.importance_weight, head.bias]
    params = [p for p in params if p is not None]
    names = ["hidden", "weight", "importance", "bias"][: len(params)]
    fn, counter = compiled(loss)
    assert_same(run_and_grads(loss, params, hidden, targets), run_and_grads(fn, params, hidden, targets), names)
    assert counter.graphs == 1


@pytest.mark.parametrize("case", CASES)
def test_tied_head_forward_and_loss_fullgraph_match_eager(backend, case):
    head = make_head(backend, 2, **case)
    emb = head.embedding
    hidden = torch.randn(2, 3, DIM, device=DEVICE, requires_grad=True)
    targets = torch.randint(1, NUM, (2, 3), device=DEVICE)
    params = [p for p in (hidden, emb.weight, emb.importance_weight, head.bias) if p is not None]
    names = ["hidden", "weight", "importance", "bias"][: len(params)]

    def forward(hidden):
        return head(hidden)

    def loss(hidden, targets):
        return head.loss(hidden, targets, chunk_size=32)

    for fn, args in ((forward, (hidden,)), (loss, (hidden, targets))):
        compiled_fn, counter = compiled(fn)
        assert_same(run_and_grads(fn, params, *args), run_and_grads(compiled_fn, params, *args), names)
        assert counter.graphs == 1, fn.__name__


def test_bloom_logits_fullgraph_float64():
    head = make_head("torch", 3, signed=True, importance=True, padding_idx=None, bias=False, dtype=torch.float64)
    emb = head.embedding
    hidden = torch.randn(4, DIM, device=DEVICE, dtype=torch.float64, requires_grad=True)
    params = [hidden, emb.weight, emb.importance_weight]

    def logits(hidden):
        return bloom_logits(hidden, emb, chunk_size=16) * 2

    fn, counter = compiled(logits)
    eager = run_and_grads(logits, params, hidden)
    assert eager[0].dtype == torch.float64
    assert_same(eager, run_and_grads(fn, params, hidden), ["hidden", "weight", "importance"])
    assert counter.graphs == 1


def test_fused_loss_compiles_once_for_new_batch_sizes():
    head = make_head("torch", 4, signed=False, importance=False, padding_idx=None, bias=True)
    fn, counter = compiled(lambda h, t: head.loss(h, t))
    for batch in (3, 5, 8, 11):
        hidden = torch.randn(batch, DIM, device=DEVICE, requires_grad=True)
        targets = torch.randint(0, NUM, (batch,), device=DEVICE)
        torch.testing.assert_close(fn(hidden, targets), head.loss(hidden, targets), rtol=1e-5, atol=1e-6)
    # The first batch size, then one dynamic-shape recompilation.
    assert counter.graphs == 2


def test_output_layer_loss_fullgraph_matches_eager():
    torch.manual_seed(5)
    layer = BloomOutputLayer(DIM, NUM, num_rows=17, num_hash_functions=3, device=DEVICE)
    hidden = torch.randn(6, DIM, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, NUM, (6,), device=DEVICE)
    params = [hidden, layer.projection.weight, layer.projection.bias]

    def loss(hidden, targets):
        return layer.loss(hidden, targets)

    fn, counter = compiled(loss)
    assert_same(
        run_and_grads(loss, params, hidden, targets),
        run_and_grads(fn, params, hidden, targets),
        ["hidden", "weight", "bias"],
    )
    assert counter.graphs == 1


def test_compiled_loss_still_rejects_out_of_range_targets():
    head = make_head("torch", 6, signed=False, importance=False, padding_idx=None, bias=False)
    fn, _ = compiled(lambda h, t: head.loss(h, t))
    hidden = torch.randn(2, DIM, device=DEVICE)
    with pytest.raises((IndexError, RuntimeError), match=str(NUM)):
        fn(hidden, torch.tensor([3, NUM], device=DEVICE))


# opcheck. -----------------------------------------------------------------------


def _op_data(backend, importance, bias):
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(11, 5, generator=g).to(DEVICE)
    imp = torch.rand(11, 3, generator=g).add_(0.5).to(DEVICE) if importance else None
    b = torch.randn(40, generator=g).to(DEVICE) if bias else None
    hidden = torch.randn(4, 5, generator=g).to(DEVICE)
    options = dict(num_hash_functions=3, padding_idx=0, num_embeddings=40, signed=importance, backend=backend, chunk=16)
    return g, hidden, weight, imp, b, options


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("importance", [False, True])
def test_opcheck_catalogue_ops(backend, importance):
    if backend == "triton":
        require_kernels()
    g, hidden, weight, imp, bias, options = _op_data(backend, importance, bias=importance)
    for t in (hidden, weight, imp, bias):
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(output_ops.catalogue_logits, (hidden, weight, imp, None), options)
    torch.library.opcheck(output_ops.catalogue_logsumexp, (hidden, bias, weight, imp, None), options)
    needs = [True, True, importance]
    grad_out = torch.randn(4, 40, generator=g).to(DEVICE)
    torch.library.opcheck(
        output_ops.catalogue_logits_backward,
        (grad_out, hidden.detach(), weight.detach(), None if imp is None else imp.detach(), None),
        {**options, "needs": needs},
    )
    lse = output_ops.catalogue_logsumexp(hidden, bias, weight, imp, None, **options).detach()
    torch.library.opcheck(
        output_ops.catalogue_logsumexp_backward,
        (
            torch.randn(4, generator=g).to(DEVICE),
            lse,
            hidden.detach(),
            None if bias is None else bias.detach(),
            weight.detach(),
            None if imp is None else imp.detach(),
            None,
        ),
        {**options, "needs": [True, bias is not None, True, importance]},
    )
