"""``torch.compile`` over the Bloom modules, and ``torch.library.opcheck`` on
the custom ops for the cases tests/test_kernels.py and tests/test_bag.py leave
out.

Most compiles use ``backend="aot_eager"``: it runs the same Dynamo capture and
AOTAutograd joint-graph trace as Inductor (which is what a graph break or a
wrong fake implementation would trip), without Inductor's C++ code generation,
which takes many seconds per graph on a 2-core CPU.  One test compiles with
the default Inductor backend.
"""

import copy

import pytest
import torch
import torch.nn as nn

from support import DEVICE, require_kernels
from triton_bloom import BloomEmbedding, BloomEmbeddingBag, FusedSGD, bloom_hash, ops

NUM_IDS = 500
DIM = 8


class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it is handed (one per
    compiled frame and recompilation) and passes them on to ``inner``."""

    def __init__(self, inner="aot_eager"):
        self.inner = inner
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.inner)(gm, example_inputs)


class Recommender(nn.Module):
    """Every lookup the modules offer: a BloomEmbedding (padding id 0,
    optionally with a hash cache) over 2-D ids, and three bags: ``sum`` with
    per-sample weights and padding over 2-D ids, ``mean`` over 1-D ids with
    ``include_last_offset`` offsets, ``max`` over 1-D ids with plain offsets."""

    def __init__(self, backend="torch", hash_cache=False, num_ids=NUM_IDS, dim=DIM):
        super().__init__()
        common = dict(num_hash_functions=3, backend=backend, device=DEVICE)
        self.item = BloomEmbedding(num_ids, dim, hash_cache=hash_cache, **common)
        self.history = BloomEmbeddingBag(num_ids, dim, mode="sum", padding_idx=0, **common)
        self.tags = BloomEmbeddingBag(num_ids, dim, mode="mean", padding_idx=0, include_last_offset=True, **common)
        self.words = BloomEmbeddingBag(num_ids, dim, mode="max", padding_idx=0, **common)
        self.head = nn.Linear(dim, 1, device=DEVICE)

    def forward(self, items, history, history_weights, tags, tag_offsets, words, word_offsets):
        x = self.item(items).sum(dim=1)
        x = x + self.history(history, per_sample_weights=history_weights)
        x = x + self.tags(tags, tag_offsets)
        x = x + self.words(words, word_offsets)
        return self.head(torch.tanh(x)).squeeze(-1)


def make_batch(batch_size, seed, num_ids=NUM_IDS):
    """One batch for ``Recommender``.  Sizes that follow the batch size never
    equal the fixed widths (3, 5) or each other by accident, so Dynamo's duck
    sizing (one symbol for equal sizes) ties nothing together that a later
    batch would tell apart.  Bags include empty ones and padding ids (0)."""
    g = torch.Generator().manual_seed(seed)
    tag_lengths = torch.full((batch_size,), 2)
    tag_lengths[0], tag_lengths[1] = 0, 4  # an empty bag; 2 * batch_size ids in all
    word_lengths = torch.full((batch_size,), 3)
    word_lengths[-1] = 0  # 3 * batch_size - 3 ids
    cumsum = lambda lengths: torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])  # noqa: E731
    items = torch.randint(0, num_ids, (batch_size, 3), generator=g)
    history = torch.randint(0, num_ids, (batch_size, 5), generator=g)
    history[0, :2] = 0  # padding
    tags = torch.randint(0, num_ids, (int(tag_lengths.sum()),), generator=g)
    tags[::3] = 0
    words = torch.randint(0, num_ids, (int(word_lengths.sum()),), generator=g).to(torch.int32)
    batch = (
        items,
        history,
        torch.rand(batch_size, 5, generator=g).requires_grad_(True),
        tags,
        cumsum(tag_lengths),  # B + 1 offsets: include_last_offset=True
        words,
        cumsum(word_lengths)[:-1],  # B offsets
    )
    return tuple(t.to(DEVICE).detach().requires_grad_(t.requires_grad) for t in batch)


def run_and_grads(model, batch):
    """Output, and the gradients of every parameter and of the per-sample weights."""
    model.zero_grad(set_to_none=True)
    psw = batch[2].detach().requires_grad_(True)
    batch = batch[:2] + (psw,) + batch[3:]
    out = model(*batch)
    out.pow(2).mean().backward()
    # A compiled module names its parameters "_orig_mod.<name>".
    grads = {name.removeprefix("_orig_mod."): p.grad for name, p in model.named_parameters()}
    grads["per_sample_weights"] = psw.grad
    return out, grads


def check_matches_eager(model, compiled, batch):
    eager_model = copy.deepcopy(model)
    out, grads = run_and_grads(compiled, batch)
    ref_out, ref_grads = run_and_grads(eager_model, batch)
    torch.testing.assert_close(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], ref_grads[name], msg=lambda m: f"{name}: {m}")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Each test counts its own compilations.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("hash_cache", [False, True])
def test_fullgraph_matches_eager(hash_cache):
    torch.manual_seed(0)
    model = Recommender(hash_cache=hash_cache)
    counter = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    check_matches_eager(model, compiled, make_batch(6, seed=1))
    assert counter.graphs == 1


def test_dynamic_batch_sizes_compile_once():
    torch.manual_seed(0)
    model = Recommender()
    counter = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    for step, batch_size in enumerate((6, 9, 13)):
        check_matches_eager(model, compiled, make_batch(batch_size, seed=step))
    assert counter.graphs == 1


def test_changing_batch_size_recompiles_once():
    # Without dynamic=True, Dynamo compiles the first shapes statically and,
    # on the first size change, once more with dynamic sizes; no more after.
    torch.manual_seed(0)
    model = Recommender()
    counter = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for step, batch_size in enumerate((6, 9, 13)):
        check_matches_eager(model, compiled, make_batch(batch_size, seed=step))
    assert counter.graphs == 2


def test_inductor_trains_like_eager():
    torch.manual_seed(0)
    model = Recommender()
    eager_model = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    eager_opt = torch.optim.Adam(eager_model.parameters(), lr=0.05)
    for step, batch_size in enumerate((6, 9)):
        batch = make_batch(batch_size, seed=step)
        for m, o in ((compiled, opt), (eager_model, eager_opt)):
            o.zero_grad()
            m(*batch).pow(2).mean().backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_triton_backend_fullgraph_matches_eager():
    # Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1), real
    # kernels on CUDA; tiny shapes, as the interpreter is slow.
    require_kernels()
    torch.manual_seed(0)
    model = Recommender(backend="triton", num_ids=60, dim=4)
    counter = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    check_matches_eager(model, compiled, make_batch(4, seed=2, num_ids=60))
    assert counter.graphs == 1


def _sparse_and_fused_models():
    torch.manual_seed(0)
    sparse = nn.ModuleList([BloomEmbedding(NUM_IDS, DIM, sparse=True, backend="torch", device=DEVICE),
                            BloomEmbeddingBag(NUM_IDS, DIM, mode="mean", sparse=True, backend="torch", device=DEVICE)])
    fused = nn.ModuleList([BloomEmbedding(NUM_IDS, DIM, fused_optimizer=FusedSGD(lr=0.5), backend="torch", device=DEVICE),
                           BloomEmbeddingBag(NUM_IDS, DIM, fused_optimizer=FusedSGD(lr=0.5), backend="torch",
                                             device=DEVICE)])  # fmt: skip
    return sparse, fused


def _rowwise_loss(modules, ids):
    return modules[0](ids).pow(2).sum() + modules[1](ids).pow(2).sum()


@pytest.mark.parametrize("kind", ["sparse", "fused"])
def test_sparse_and_fused_compile_with_graph_breaks(kind):
    # sparse=True and fused optimizers run autograd.Functions (rowwise.py)
    # that Dynamo cannot capture whole (see the fullgraph test below); without
    # fullgraph they fall back to eager around the breaks and stay exact.
    model = dict(zip(("sparse", "fused"), _sparse_and_fused_models()))[kind]
    eager_model = copy.deepcopy(model)  # its own FusedSGD objects too
    compiled = torch.compile(lambda ids: _rowwise_loss(model, ids), backend="aot_eager")
    for step in range(2):
        ids = torch.randint(0, NUM_IDS, (5, 3), generator=torch.Generator().manual_seed(step)).to(DEVICE)
        compiled(ids).backward()
        _rowwise_loss(eager_model, ids).backward()
        for m, e in zip(model, eager_model):
            if kind == "sparse":
                assert m.weight.grad.layout == torch.sparse_coo
                torch.testing.assert_close(m.weight.grad.to_dense(), e.weight.grad.to_dense())
            else:
                assert m.weight.grad is None
                torch.testing.assert_close(m.weight, e.weight)


@pytest.mark.xfail(
    strict=True,
    reason="sparse=True / fused optimizers are not fullgraph-capturable yet: the id-range check and the "
    "wide-id branch of the hashing read tensor values outside a custom op, the sparse backward builds a "
    "sparse_coo_tensor, and FusedRowWiseAdagrad creates its state inside the backward",
)
@pytest.mark.parametrize("kind", ["sparse", "fused"])
def test_sparse_and_fused_fullgraph(kind):
    model = dict(zip(("sparse", "fused"), _sparse_and_fused_models()))[kind]
    compiled = torch.compile(lambda ids: _rowwise_loss(model, ids), backend="aot_eager", fullgraph=True)
    compiled(torch.randint(0, NUM_IDS, (5, 3)).to(DEVICE)).backward()


# opcheck: the schema, fake implementation, autograd registration and AOT
# dispatch of every op, for the argument combinations not covered in
# test_kernels.py (bloom_forward with a cache and padding 0, bloom_backward
# without a cache) and test_bag.py (forward: sum+weights, mean/max with
# padding; backward: sum with weights).

OPCHECK_BACKENDS = ["torch", "triton"]


def op_args(op, **values):
    """``op``'s positional arguments, taken by name from ``values``.

    Naming the arguments keeps these checks meaningful when an op gains an
    argument for a new feature: an optional one this test does not name is
    passed as ``None`` and a ``bool`` one as ``False`` (the feature off), and
    names the op does not take are ignored (``num_rows`` and ``weight``, say,
    when one replaces the other)."""
    args = []
    for arg in op._opoverload._schema.arguments:
        if arg.name in values:
            args.append(values[arg.name])
        elif isinstance(arg.type, torch.OptionalType):
            args.append(None)
        elif str(arg.type) == "bool":
            args.append(False)
        else:
            raise KeyError(f"{op._opoverload}: no value for argument {arg.name!r}")
    return tuple(args)


def _opcheck_data():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 40, (7,), generator=g)
    ids[2] = 0  # a padding id when padding_idx=0
    weight = torch.randn(9, 5, generator=g)
    cache = bloom_hash(torch.arange(40), 3, 9).to(torch.int32)
    return g, ids.to(DEVICE), weight.to(DEVICE), cache.to(DEVICE)


def _check_backend(backend):
    if backend == "triton":
        require_kernels()


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
def test_opcheck_embedding_ops(backend):
    _check_backend(backend)
    g, ids, weight, cache = _opcheck_data()
    grad_out = torch.randn(7, 5, generator=g).to(DEVICE)
    common = dict(num_hash_functions=3, num_embeddings=40, backend=backend)
    # Backward with a hash cache, with and without padding; int32 ids and a float64 table.
    for padding_idx in (None, 0):
        args = op_args(ops.bloom_backward, grad_out=grad_out, ids=ids, hash_cache=cache, padding_idx=padding_idx,
                       weight=weight, num_rows=9, dtype=torch.float32, **common)  # fmt: skip
        torch.library.opcheck(ops.bloom_backward, args)
    args = op_args(ops.bloom_backward, grad_out=grad_out.double(), ids=ids.int(), hash_cache=cache, padding_idx=0,
                   weight=weight.double(), num_rows=9, dtype=torch.float64, **common)  # fmt: skip
    torch.library.opcheck(ops.bloom_backward, args)
    # Forward without padding over int32 ids, and with num_embeddings=None
    # (int64 ids then take the wide-id hashing path).
    weight.requires_grad_(True)
    args = op_args(ops.bloom_forward, ids=ids.int(), weight=weight, padding_idx=None, **common)
    torch.library.opcheck(ops.bloom_forward, args)
    args = op_args(ops.bloom_forward, ids=ids, weight=weight, padding_idx=0, **{**common, "num_embeddings": None})
    torch.library.opcheck(ops.bloom_forward, args)


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
def test_opcheck_bag_ops(backend):
    _check_backend(backend)
    g, ids, weight, _ = _opcheck_data()
    offsets = torch.tensor([0, 3, 3, 7], device=DEVICE)
    grad_out = torch.randn(3, 5, generator=g).to(DEVICE)
    common = dict(ids=ids, offsets=offsets, num_hash_functions=3, num_embeddings=40, backend=backend)
    # Backward of mean and max (with its arg-max positions), with and without padding.
    for mode in (ops.MODE_MEAN, ops.MODE_MAX):
        for padding_idx in (None, 0):
            args = op_args(ops.bloom_bag_forward, weight=weight, mode=mode, padding_idx=padding_idx, **common)
            argmax = ops.bloom_bag_forward(*args)[1]
            args = op_args(ops.bloom_bag_backward, grad_out=grad_out, weight=weight, argmax=argmax, mode=mode,
                           padding_idx=padding_idx, **common)  # fmt: skip
            torch.library.opcheck(ops.bloom_bag_backward, args)
    # Sum with per-sample weights and padding: backward, then forward with autograd.
    psw = torch.rand(7, generator=g).to(DEVICE)
    no_argmax = torch.empty(0, dtype=torch.int64, device=DEVICE)
    args = op_args(ops.bloom_bag_backward, grad_out=grad_out, weight=weight, per_sample_weights=psw, argmax=no_argmax,
                   mode=ops.MODE_SUM, padding_idx=0, psw_grad=True, **common)  # fmt: skip
    torch.library.opcheck(ops.bloom_bag_backward, args)
    weight.requires_grad_(True)
    psw.requires_grad_(True)
    args = op_args(ops.bloom_bag_forward, weight=weight, per_sample_weights=psw, mode=ops.MODE_SUM, padding_idx=0,
                   **common)  # fmt: skip
    torch.library.opcheck(ops.bloom_bag_forward, args)
    # Max over int32 ids with num_embeddings=None, and sum without weights.
    args = op_args(ops.bloom_bag_forward, weight=weight, mode=ops.MODE_MAX, padding_idx=None,
                   **{**common, "ids": ids.int(), "num_embeddings": None})  # fmt: skip
    torch.library.opcheck(ops.bloom_bag_forward, args)
    args = op_args(ops.bloom_bag_forward, weight=weight, mode=ops.MODE_SUM, padding_idx=None, **common)
    torch.library.opcheck(ops.bloom_bag_forward, args)
