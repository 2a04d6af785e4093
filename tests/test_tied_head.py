"""``TiedBloomLinear`` holds its embedding in its own module tree: moving or
casting the head alone moves the table, an optimizer over the head alone
trains it, and in a model that holds the same embedding beside the head the
table's parameters are counted once and its state is saved once and
round-trips, in either order of the two in the model."""

import io

import pytest
import torch
import torch.nn as nn
from support import DEVICE

from triton_bloom import BloomEmbedding, TiedBloomLinear, embedding_bytes

NUM, DIM = 300, 12


def make_head(seed, *, importance=False, bias=True):
    torch.manual_seed(seed)
    emb = BloomEmbedding(NUM, DIM, num_rows=37, num_hash_functions=3, padding_idx=None, importance=importance)
    return TiedBloomLinear(emb, torch.randn(NUM) if bias else None).to(DEVICE)


class Model(nn.Module):
    """An input embedding and the head tied to it; ``head_first`` registers
    the head before the embedding."""

    def __init__(self, seed, head_first=False, importance=False):
        super().__init__()
        head = make_head(seed, importance=importance)
        if head_first:
            self.head = head
            self.emb = head.embedding
        else:
            self.emb = head.embedding
            self.head = head

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def brute_logits(head, hidden):
    vectors = head.embedding(torch.arange(NUM, device=hidden.device)).to(hidden.dtype)
    return hidden @ vectors.T + (0 if head.bias is None else head.bias.to(hidden.dtype))


def test_to_dtype_on_the_head_alone_casts_the_table():
    head = make_head(0, importance=True)
    head.to(torch.float64)
    emb = head.embedding
    assert emb.weight.dtype == torch.float64 and emb.importance_weight.dtype == torch.float64
    assert head.bias.dtype == torch.float64
    hidden = torch.randn(4, DIM, dtype=torch.float64, device=DEVICE)
    out = head(hidden)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, brute_logits(head, hidden))


def test_the_heads_parameters_include_the_table():
    head = make_head(1)
    params = list(head.parameters())
    assert any(p is head.embedding.weight for p in params) and any(p is head.bias for p in params)
    # An optimizer over the head alone trains the table too.
    before = head.embedding.weight.detach().clone()
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    head.loss(torch.randn(5, DIM, device=DEVICE), torch.randint(0, NUM, (5,), device=DEVICE)).backward()
    opt.step()
    assert not torch.equal(head.embedding.weight.detach(), before)


@pytest.mark.parametrize("head_first", [False, True])
@pytest.mark.parametrize("importance", [False, True])
def test_shared_table_counted_once(head_first, importance):
    model = Model(2, head_first, importance)
    emb, head = model.emb, model.head
    expected = emb.weight.numel() + head.bias.numel() + (emb.importance_weight.numel() if importance else 0)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    assert embedding_bytes(model) == expected * 4
    assert sum(m is emb for m in model.modules()) == 1


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("head_first", [False, True])
def test_state_dict_round_trip_in_a_model(head_first):
    model, fresh = Model(3, head_first, importance=True), Model(4, head_first, importance=True)
    ids = torch.randint(0, NUM, (6, 3), device=DEVICE)
    assert not torch.allclose(model(ids), fresh(ids))
    state = model.state_dict()
    if not head_first:
        # The table's state is saved once, under the embedding's keys.
        assert not any(key.startswith("head.embedding.") for key in state)
        assert sum(key.endswith("embeddings.weight") for key in state) == 1
    result = fresh.load_state_dict(roundtrip(state))
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)
    assert fresh.head.embedding is fresh.emb  # still one table after loading


def test_state_dict_round_trip_of_the_head_alone():
    head, fresh = make_head(5, importance=True), make_head(6, importance=True)
    state = head.state_dict()
    assert {"bias", "embedding.embeddings.weight", "embedding.importance_weight"} <= set(state)
    fresh.load_state_dict(roundtrip(state))
    hidden = torch.randn(3, DIM, device=DEVICE)
    torch.testing.assert_close(fresh(hidden), head(hidden), rtol=0, atol=0)


def test_partial_table_state_is_still_an_error():
    head, fresh = make_head(7, importance=True), make_head(8, importance=True)
    state = head.state_dict()
    del state["embedding.importance_weight"]
    with pytest.raises(RuntimeError, match="embedding.importance_weight"):
        fresh.load_state_dict(state)
