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

from triton_bloom import BloomEmbedding, BloomEmbeddingBag, FusedRowWiseAdagrad, FusedSGD, bloom_hash, ops
from triton_bloom.constants import FUSED_ROWWISE_ADAGRAD, FUSED_SGD, MODE_MAX, MODE_MEAN, MODE_SUM

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


TRAININGS = ["sparse", "fused_sgd", "fused_adagrad"]


def _training(kind):
    """Each table's own training option (a fused optimizer belongs to one table)."""
    if kind == "sparse":
        return dict(sparse=True)
    if kind == "fused_sgd":
        return dict(fused_optimizer=FusedSGD(lr=0.5))
    return dict(fused_optimizer=FusedRowWiseAdagrad(lr=0.5, eps=1e-6, initial_accumulator_value=0.1))


class RowwiseRecommender(nn.Module):
    """``Recommender``'s lookups with sparse gradients or fused optimizers:
    a signed BloomEmbedding with importance weights and a hash cache, and
    ``sum`` (with per-sample weights), ``mean`` and ``max`` bags with padding."""

    def __init__(self, kind, backend="torch", num_ids=NUM_IDS, dim=DIM):
        super().__init__()
        common = dict(num_hash_functions=3, backend=backend, device=DEVICE)
        self.item = BloomEmbedding(
            num_ids, dim, hash_cache=True, signed=True, importance=True, importance_rows=7, **common, **_training(kind)
        )
        self.history = BloomEmbeddingBag(num_ids, dim, mode="sum", padding_idx=0, **common, **_training(kind))
        self.tags = BloomEmbeddingBag(
            num_ids, dim, mode="mean", padding_idx=0, include_last_offset=True, **common, **_training(kind)
        )
        self.words = BloomEmbeddingBag(num_ids, dim, mode="max", padding_idx=0, **common, **_training(kind))

    def forward(self, items, history, history_weights, tags, tag_offsets, words, word_offsets):
        x = self.item(items).sum(dim=1)
        x = x + self.history(history, per_sample_weights=history_weights)
        x = x + self.tags(tags, tag_offsets)
        x = x + self.words(words, word_offsets)
        return x


def rowwise_step(model, batch):
    """One training step: output, the gradients autograd leaves (tables'
    sparse ones as their indices and values), the tables after it, and the
    fused optimizers' states."""
    model.zero_grad(set_to_none=True)
    psw = batch[2].detach().requires_grad_(True)
    out = model(*batch[:2], psw, *batch[3:])
    out.pow(2).mean().backward()
    grads = {"per_sample_weights": psw.grad}
    tables, states = {}, {}
    for name, p in model.named_parameters():
        name = name.removeprefix("_orig_mod.")
        if p.grad is not None and p.grad.is_sparse:
            grads[name] = (p.grad._indices(), p.grad._values())
        else:
            grads[name] = p.grad
        tables[name] = p.detach().clone()
    for name, module in model.named_modules():
        optimizer = getattr(module, "fused_optimizer", None)
        if optimizer is not None and optimizer.state(module.weight) is not None:
            states[name.removeprefix("_orig_mod.")] = optimizer.state(module.weight).clone()
    return out.detach(), grads, tables, states


def check_rowwise_training_matches_eager(
    kind, backend="torch", num_ids=NUM_IDS, dim=DIM, batch_sizes=(6, 6), dynamic=None
):
    """Train a compiled ``RowwiseRecommender`` and an eager copy side by side,
    one step per batch size (each step starts from the last one's tables and
    states); returns the compiled graphs after the first step and at the end."""
    torch.manual_seed(0)
    model = RowwiseRecommender(kind, backend=backend, num_ids=num_ids, dim=dim)
    eager_model = copy.deepcopy(model)  # its own fused optimizers and states too
    counter = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend=counter)
    graphs = []
    for step, batch_size in enumerate(batch_sizes):
        batch = make_batch(batch_size, seed=step, num_ids=num_ids)
        out, grads, tables, states = rowwise_step(compiled, batch)
        ref_out, ref_grads, ref_tables, ref_states = rowwise_step(eager_model, batch)
        graphs.append(counter.graphs)
        torch.testing.assert_close(out, ref_out)
        assert grads.keys() == ref_grads.keys() and states.keys() == ref_states.keys()
        for name, ref in ref_grads.items():
            got = grads[name]
            if name.endswith("embeddings.weight") and kind != "sparse":
                assert ref is None and got is None, name  # the fused step left no gradient
            elif name.endswith("embeddings.weight"):
                assert isinstance(ref, tuple) and isinstance(got, tuple), name  # sparse on both sides
                assert torch.equal(got[0], ref[0]), name  # the same touched rows, in the same order
                torch.testing.assert_close(got[1], ref[1], msg=lambda m: f"{name}: {m}")
            else:
                assert ref is not None and got is not None, name
                torch.testing.assert_close(got, ref, msg=lambda m: f"{name}: {m}")
        for name, ref in {**ref_tables, **ref_states}.items():
            torch.testing.assert_close({**tables, **states}[name], ref, msg=lambda m: f"{name}: {m}")
        if kind == "fused_adagrad":
            assert len(states) == 4
    return graphs[0], graphs[-1]


@pytest.mark.parametrize("kind", TRAININGS)
def test_sparse_and_fused_fullgraph_match_eager(kind):
    # The touched rows come out of the backward op as dense tensors of a
    # data-dependent size; the sparse gradient is built from them, and the
    # fused step is a custom op that mutates the table and the optimizer
    # state (forward inputs) inside the backward, which AOTAutograd keeps.
    assert check_rowwise_training_matches_eager(kind) == (1, 1)


@pytest.mark.parametrize("kind", ["sparse", "fused_adagrad"])
def test_sparse_and_fused_dynamic_batch_sizes_compile_once(kind):
    # (Under dynamic=True, Dynamo may trace the first step twice, restarting
    # once to specialize the optimizer's float lr: count graphs after it.)
    first, last = check_rowwise_training_matches_eager(kind, batch_sizes=(6, 9, 13), dynamic=True)
    assert last == first


def test_functional_fused_adagrad_state_made_before_compiling():
    # A compiled backward can update the optimizer's state but not create it
    # (AOTAutograd keeps in-place updates of graph inputs only): a module
    # makes it when built; with the functional API the caller does.
    from triton_bloom.functional import bloom_embedding

    torch.manual_seed(0)
    weights = [torch.randn(40, DIM, device=DEVICE).requires_grad_(True) for _ in range(2)]
    weights[1].data.copy_(weights[0].data)
    optimizers = [FusedRowWiseAdagrad(lr=0.5) for _ in range(2)]

    def loss(ids, weight, optimizer):
        return bloom_embedding(ids, weight, 3, fused_optimizer=optimizer, backend="torch").pow(2).sum()

    ids = torch.randint(0, NUM_IDS, (5, 3), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="state must exist"):
        compiled(ids, weights[0], optimizers[0])
    optimizers[0].state(weights[0])
    for step in range(2):
        compiled(ids, weights[0], optimizers[0]).backward()
        loss(ids, weights[1], optimizers[1]).backward()
        torch.testing.assert_close(weights[0], weights[1])
        torch.testing.assert_close(optimizers[0].accumulator, optimizers[1].accumulator)


@pytest.mark.parametrize("kind", TRAININGS)
def test_triton_backend_sparse_and_fused_fullgraph_match_eager(kind):
    require_kernels()
    graphs = check_rowwise_training_matches_eager(kind, backend="triton", num_ids=60, dim=4, batch_sizes=(4, 4))
    assert graphs == (1, 1)


# opcheck: the schema, fake implementation, autograd registration and AOT
# dispatch of every op, for the argument combinations not covered in
# test_kernels.py (bloom_forward with a cache and padding 0, bloom_backward
# without a cache) and test_bag.py (forward: sum+weights, mean/max with
# padding; backward: sum with weights), and the ops of sparse gradients and
# fused optimizers.

OPCHECK_BACKENDS = ["torch", "triton"]


def op_args(op, **values):
    """``(args, kwargs)`` of ``op``, taken by name from ``values``, for ``opcheck``.

    Naming the arguments keeps these checks meaningful when an op gains an
    argument for a new feature: an optional one this test does not name is
    passed as ``None``, a ``bool`` one as ``False`` (the feature off), and one
    with a default keeps it; names the op does not take are ignored
    (``argmax``, say, for the embedding's ops)."""
    args, kwargs = [], {}
    for arg in op._opoverload._schema.arguments:
        if arg.name in values:
            value = values[arg.name]
        elif arg.has_default_value():
            continue
        elif isinstance(arg.type, torch.OptionalType):
            value = None
        elif str(arg.type) == "bool":
            value = False
        else:
            raise KeyError(f"{op._opoverload}: no value for argument {arg.name!r}")
        if arg.kwarg_only:
            kwargs[arg.name] = value
        else:
            args.append(value)
    return tuple(args), kwargs


def opcheck(op, **values):
    torch.library.opcheck(op, *op_args(op, **values))


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
    common = dict(num_hash_functions=3, num_embeddings=40, use_triton=backend == "triton")
    # Backward with a hash cache, with and without padding; int32 ids and a float64 table.
    for padding_idx in (None, 0):
        opcheck(
            ops.bloom_backward,
            grad_out=grad_out,
            ids=ids,
            hash_cache=cache,
            padding_idx=padding_idx,
            weight=weight,
            **common,
        )
    opcheck(
        ops.bloom_backward,
        grad_out=grad_out.double(),
        ids=ids.int(),
        hash_cache=cache,
        padding_idx=0,
        weight=weight.double(),
        **common,
    )
    # Forward without padding over int32 ids, and with num_embeddings=None
    # (int64 ids then take the wide-id hashing path).
    weight.requires_grad_(True)
    opcheck(ops.bloom_forward, ids=ids.int(), weight=weight, padding_idx=None, **common)
    opcheck(ops.bloom_forward, ids=ids, weight=weight, padding_idx=0, **{**common, "num_embeddings": None})


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
def test_opcheck_bag_ops(backend):
    _check_backend(backend)
    g, ids, weight, _ = _opcheck_data()
    offsets = torch.tensor([0, 3, 3, 7], device=DEVICE)
    grad_out = torch.randn(3, 5, generator=g).to(DEVICE)
    common = dict(ids=ids, offsets=offsets, num_hash_functions=3, num_embeddings=40, use_triton=backend == "triton")
    # Backward of mean and max (with its arg-max positions), with and without padding.
    for mode in (MODE_MEAN, MODE_MAX):
        for padding_idx in (None, 0):
            args, kwargs = op_args(ops.bloom_bag_forward, weight=weight, mode=mode, padding_idx=padding_idx, **common)
            argmax = ops.bloom_bag_forward(*args, **kwargs)[1]
            opcheck(
                ops.bloom_bag_backward,
                grad_out=grad_out,
                weight=weight,
                argmax=argmax,
                mode=mode,
                padding_idx=padding_idx,
                **common,
            )
    # Sum with per-sample weights and padding: backward, then forward with autograd.
    psw = torch.rand(7, generator=g).to(DEVICE)
    no_argmax = torch.empty(0, dtype=torch.int64, device=DEVICE)
    opcheck(
        ops.bloom_bag_backward,
        grad_out=grad_out,
        weight=weight,
        per_sample_weights=psw,
        argmax=no_argmax,
        mode=MODE_SUM,
        padding_idx=0,
        psw_grad=True,
        **common,
    )
    weight.requires_grad_(True)
    psw.requires_grad_(True)
    opcheck(ops.bloom_bag_forward, weight=weight, per_sample_weights=psw, mode=MODE_SUM, padding_idx=0, **common)
    # Max over int32 ids with num_embeddings=None, and sum without weights.
    opcheck(
        ops.bloom_bag_forward,
        weight=weight,
        mode=MODE_MAX,
        padding_idx=None,
        **{**common, "ids": ids.int(), "num_embeddings": None},
    )
    opcheck(ops.bloom_bag_forward, weight=weight, mode=MODE_SUM, padding_idx=None, **common)


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
def test_opcheck_touched_row_ops(backend):
    # The backward ops of sparse gradients and fused optimizers (a
    # data-dependent number of rows), and the forward with sparse=True.
    _check_backend(backend)
    g, ids, weight, cache = _opcheck_data()
    use_triton = backend == "triton"
    importance = torch.rand(4, 3, generator=g).to(DEVICE)
    common = dict(ids=ids, weight=weight, num_hash_functions=3, num_embeddings=40, use_triton=use_triton)
    grad_out = torch.randn(7, 5, generator=g).to(DEVICE)
    for hash_cache, signed, imp in ((cache, False, None), (None, True, importance)):
        opcheck(
            ops.bloom_backward_rows,
            grad_out=grad_out,
            hash_cache=hash_cache,
            signed=signed,
            importance=imp,
            padding_idx=0,
            **common,
        )
    offsets = torch.tensor([0, 3, 3, 7], device=DEVICE)
    bag_grad = torch.randn(3, 5, generator=g).to(DEVICE)
    psw = torch.rand(7, generator=g).to(DEVICE)
    for mode in (MODE_SUM, MODE_MAX):
        args, kwargs = op_args(ops.bloom_bag_forward, offsets=offsets, mode=mode, padding_idx=0, **common)
        argmax = ops.bloom_bag_forward(*args, **kwargs)[1]
        opcheck(
            ops.bloom_bag_backward_rows,
            grad_out=bag_grad,
            offsets=offsets,
            argmax=argmax,
            mode=mode,
            per_sample_weights=psw if mode == MODE_SUM else None,
            psw_grad=mode == MODE_SUM,
            signed=True,
            importance=importance,
            padding_idx=0,
            **common,
        )
    opcheck(ops.bloom_forward, padding_idx=0, sparse=True, **{**common, "weight": weight.requires_grad_(True)})


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
def test_opcheck_rowwise_update(backend):
    _check_backend(backend)
    g, _, weight, _ = _opcheck_data()
    rows = torch.tensor([0, 4, 8], device=DEVICE)
    values = torch.randn(3, 5, generator=g).to(DEVICE)
    use_triton = backend == "triton"
    opcheck(
        ops.bloom_rowwise_update,
        weight=weight,
        rows=rows,
        values=values,
        optimizer=FUSED_SGD,
        lr=0.1,
        use_triton=use_triton,
    )
    state = torch.rand(9, generator=g).to(DEVICE)
    opcheck(
        ops.bloom_rowwise_update,
        weight=weight,
        rows=rows,
        values=values,
        state=state,
        optimizer=FUSED_ROWWISE_ADAGRAD,
        lr=0.1,
        eps=1e-8,
        use_triton=use_triton,
    )
