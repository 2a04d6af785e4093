"""Data-parallel (DistributedDataParallel) and sharded (FSDP2, ``fully_shard``)
training of a model holding Bloom modules: two processes on the gloo backend,
CPU tensors, loopback only.

Each rank trains on its half of every global batch with a mean loss.  DDP
averages the ranks' gradients and FSDP2 reduce-scatters their average, which
is the gradient of the mean loss over the whole batch, so after a few steps
the weights must equal a single process trained on the full batches.
"""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from support import free_port, spawn_ranks

from triton_bloom import BloomEmbedding, BloomEmbeddingBag

WORLD_SIZE = 2
GLOBAL_BATCH = 8
STEPS = 3
# The optimizers each kind of training is checked with (torch.optim.Adam
# takes no sparse gradients; SGD with momentum does).
OPTIMIZERS = {"ddp": ("sgd", "adam"), "fsdp2": ("sgd", "adam"), "ddp-sparse": ("sgd",)}
TIMEOUT_S = 50  # per test, start-up included; the collectives time out sooner


class TwoTower(nn.Module):
    """A user id and a bag of the user's past items, through Bloom tables, into a linear head."""

    def __init__(self, sparse=False):
        super().__init__()
        self.user = BloomEmbedding(1000, 8, num_hash_functions=3, sparse=sparse)  # padding_idx=0
        self.history = BloomEmbeddingBag(2000, 8, num_hash_functions=2, mode="mean", padding_idx=0, sparse=sparse)
        self.head = nn.Linear(16, 1)

    def forward(self, users, history):
        return self.head(torch.cat([self.user(users), self.history(history)], dim=1)).squeeze(-1)


def make_model(kind):
    torch.manual_seed(0)
    return TwoTower(sparse=kind == "ddp-sparse")


def make_optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    return torch.optim.Adam(params, lr=0.05)


def global_batches():
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        users = torch.randint(0, 1000, (GLOBAL_BATCH,), generator=g)
        users[0] = 0  # padding
        history = torch.randint(0, 2000, (GLOBAL_BATCH, 4), generator=g)
        history[:, -1] = 0  # padding in every bag
        batches.append((users, history, torch.randn(GLOBAL_BATCH, generator=g)))
    return batches


def train(model, optimizer, rank=None):
    """``STEPS`` steps of mean squared error; ``rank`` trains on its half of each batch."""
    for users, history, target in global_batches():
        if rank is not None:
            half = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
            users, history, target = users[half], history[half], target[half]
        optimizer.zero_grad()
        nn.functional.mse_loss(model(users, history), target).backward()
        optimizer.step()


def full_parameters(model):
    """Every parameter by name, gathered whole (FSDP2 holds DTensor shards)."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def wrap(model, kind):
    """``model`` ready for data-parallel (``"ddp"``, ``"ddp-sparse"``) or
    sharded (``"fsdp2"``) training."""
    if kind.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    # Each Bloom table is its own FSDP unit, all-gathered just for its lookup
    # and resharded after; the root unit holds the rest (the head).
    fully_shard(model.user, mesh=mesh)
    fully_shard(model.history, mesh=mesh)
    fully_shard(model, mesh=mesh)
    table = model.user.weight
    assert table.to_local().shape[0] == table.shape[0] // WORLD_SIZE, "the table is not sharded"
    return model


def _worker(rank, kind, port, out_dir):
    # Loopback only: the rendezvous address, and gloo's own sockets.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=30))
    try:
        for optimizer_name in OPTIMIZERS[kind]:
            model = make_model(kind)
            wrapped = wrap(model, kind)
            train(wrapped, make_optimizer(optimizer_name, wrapped.parameters()), rank)
            params = full_parameters(model)
            if rank == 0:
                torch.save(params, os.path.join(out_dir, f"{optimizer_name}.pt"))
    finally:
        dist.destroy_process_group()
    # Done: skip the interpreter's teardown, where a rank that ran sparse
    # collectives has been seen to hang (gloo's threads) after its work was saved.
    os._exit(0)


def run_two_ranks(kind, out_dir):
    """Train on two spawned ranks, once per optimizer; the parameters
    (gathered on rank 0) by optimizer name.

    A rank's exception is raised here with its traceback; a hang ends at
    ``TIMEOUT_S`` with both processes killed."""
    spawn_ranks(_worker, (kind, free_port(), str(out_dir)), WORLD_SIZE, TIMEOUT_S, f"{kind} training")
    return {name: torch.load(os.path.join(out_dir, f"{name}.pt")) for name in OPTIMIZERS[kind]}


def check_trains_like_one_process(kind, tmp_path):
    if not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    distributed = run_two_ranks(kind, tmp_path)
    for optimizer_name in OPTIMIZERS[kind]:
        model = make_model(kind)
        initial = full_parameters(model)
        train(model, make_optimizer(optimizer_name, model.parameters()))
        single = full_parameters(model)
        assert distributed[optimizer_name].keys() == single.keys()
        for name in single:
            assert not torch.equal(single[name], initial[name]), f"{name} did not train"
            torch.testing.assert_close(
                distributed[optimizer_name][name],
                single[name],
                atol=1e-5,
                rtol=1e-5,
                msg=lambda m: f"{kind}, {optimizer_name}, {name}: {m}",
            )


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_ranks_train_like_one_process(kind, tmp_path):
    check_trains_like_one_process(kind, tmp_path)


def test_ddp_sparse_gradients(tmp_path):
    check_trains_like_one_process("ddp-sparse", tmp_path)
