"""``bloomify`` on two small real models, a two-tower recommender and a tiny
transformer language model (tied and untied), plus its edge cases."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from triton_bloom import BloomEmbedding, BloomEmbeddingBag, TiedBloomLinear
from triton_bloom.convert import BloomifyReport, bloomify

FLOAT_BYTES = 4


class TwoTower(nn.Module):
    """A user tower (user id, and the bag of items in the user's history) and
    an item tower (item id, and its genre: a small table bloomify leaves alone);
    the score is the dot product of the towers."""

    def __init__(self, num_users=20_000, num_items=30_000, num_genres=20, dim=16):
        super().__init__()
        self.user_id = nn.Embedding(num_users, dim)  # padding_idx=None: must stay None
        self.user_history = nn.EmbeddingBag(num_items, dim, mode="mean", padding_idx=0, include_last_offset=True)
        self.user_mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.item_id = nn.Embedding(num_items, dim, padding_idx=0)
        self.item_genre = nn.Embedding(num_genres, dim)
        self.item_mlp = nn.Linear(2 * dim, dim)

    def forward(self, users, history, history_offsets, items, genres):
        user = self.user_mlp(torch.cat([self.user_id(users), self.user_history(history, history_offsets)], dim=1))
        item = self.item_mlp(torch.cat([self.item_id(items), self.item_genre(genres)], dim=1))
        return (user * item).sum(dim=1)


class TinyLM(nn.Module):
    """A one-block causal transformer language model; ``tie=True`` shares the
    token embedding with the output projection (``lm_head.weight = tok_emb.weight``)."""

    def __init__(self, vocab=12_000, dim=32, context=16, tie=True):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(context, dim)
        self.block = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, ids):
        length = ids.shape[1]
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(length, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
        return self.lm_head(self.norm(self.block(x, src_mask=mask, is_causal=True)))


def two_tower_batch(g, batch=32, num_users=20_000, num_items=30_000):
    lengths = torch.randint(0, 5, (batch,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])  # include_last_offset
    history = torch.randint(0, num_items, (int(lengths.sum()),), generator=g)
    history[::4] = 0  # padding
    return (
        torch.randint(0, num_users, (batch,), generator=g),
        history,
        offsets,
        torch.randint(0, num_items, (batch,), generator=g),
        torch.randint(0, 20, (batch,), generator=g),
    )


def train_two_tower(model, steps=40):
    """Fit fixed labels of one fixed batch; the losses of the first and last step."""
    g = torch.Generator().manual_seed(0)
    batch = two_tower_batch(g)
    labels = torch.randint(0, 2, (32,), generator=g).float()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(*batch), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def train_lm(model, steps=30, vocab=12_000):
    """Learn a fixed next-token rule over a few hundred tokens; first and last losses."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (300,), generator=g)
    successor = dict(zip(tokens[:-1].tolist(), tokens[1:].tolist()))
    starts = torch.randint(0, 300, (8,), generator=g)
    ids = torch.stack([tokens[(s + torch.arange(16)) % 300] for s in starts])
    targets = torch.tensor([[successor.get(t, t) for t in row] for row in ids.tolist()])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def parameter_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_two_tower():
    torch.manual_seed(0)
    model = TwoTower()
    before = parameter_bytes(model)
    report = bloomify(model, compression_ratio=0.2, num_hash_functions=4)

    assert isinstance(report, BloomifyReport)
    assert [r.name for r in report.replaced] == ["user_id", "user_history", "item_id"]
    assert [(s.name, s.reason) for s in report.skipped] == [("item_genre", "20 rows < min_num_embeddings=10000")]

    # The same settings, the Bloom modules' own defaults notwithstanding.
    assert type(model.user_id) is BloomEmbedding and model.user_id.padding_idx is None
    assert type(model.item_id) is BloomEmbedding and model.item_id.padding_idx == 0
    bag = model.user_history
    assert type(bag) is BloomEmbeddingBag
    assert (bag.mode, bag.padding_idx, bag.include_last_offset) == ("mean", 0, True)
    assert type(model.item_genre) is nn.Embedding
    for module, rows in ((model.user_id, 20_000), (model.user_history, 30_000), (model.item_id, 30_000)):
        assert (module.num_embeddings, module.embedding_dim, module.num_hash_functions) == (rows, 16, 4)
        assert module.weight.shape == (int(0.2 * rows), 16)
        assert module.weight.dtype == torch.float32 and not module.sparse

    # The report's numbers.
    sizes = {"user_id": 20_000, "user_history": 30_000, "item_id": 30_000}
    for r in report.replaced:
        assert r.bytes_before == sizes[r.name] * 16 * FLOAT_BYTES
        assert r.bytes_after == int(0.2 * sizes[r.name]) * 16 * FLOAT_BYTES
    assert report.skipped[0].bytes == 20 * 16 * FLOAT_BYTES
    assert report.model_bytes_before == before
    assert report.model_bytes_after == parameter_bytes(model) < before
    assert report.bytes_saved == before - parameter_bytes(model) == report.bytes_before - report.bytes_after
    text = str(report)
    assert "replaced 3 of 4 embedding tables" in text and "item_genre" in text and "min_num_embeddings" in text

    # The same calls still run, and it trains.
    first, last = train_two_tower(model)
    assert last < 0.5 * first


def test_tiny_lm_tied_is_skipped():
    torch.manual_seed(0)
    model = TinyLM(tie=True)
    before = parameter_bytes(model)
    report = bloomify(model)
    assert report.replaced == []
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["tok_emb"].startswith("weight tied to lm_head.weight")
    assert reasons["pos_emb"] == "16 rows < min_num_embeddings=10000"
    assert type(model.tok_emb) is nn.Embedding and model.lm_head.weight is model.tok_emb.weight
    assert report.model_bytes_before == report.model_bytes_after == before  # the shared weight counted once
    first, last = train_lm(model)
    assert last < first


def test_tiny_lm_tied_share_uses_one_bloom_table_at_both_ends():
    torch.manual_seed(0)
    model = TinyLM(tie=True)
    model.lm_head.bias = nn.Parameter(torch.randn(12_000))
    report = bloomify(model, compression_ratio=0.1, num_hash_functions=2, tied="share")
    assert [r.name for r in report.replaced] == ["tok_emb"]
    emb, head = model.tok_emb, model.lm_head
    assert isinstance(emb, BloomEmbedding) and isinstance(head, TiedBloomLinear) and head.embedding is emb
    # The head scores every id against the table's vectors, with its bias.
    hidden = torch.randn(3, 32)
    vectors = emb(torch.arange(12_000))
    torch.testing.assert_close(head(hidden), hidden @ vectors.T + head.bias, rtol=1e-4, atol=1e-5)
    # One table, stored once, trained from both ends.
    assert report.model_bytes_after < report.model_bytes_before / 5
    assert sum("embeddings.weight" in key for key in model.state_dict()) == 1
    head(hidden).sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0
    first, last = train_lm(model)
    assert last < first


def test_tiny_lm_tied_error_leaves_model_unchanged():
    model = TinyLM(tie=True)
    with pytest.raises(ValueError, match=r"tok_emb .*tied to lm_head\.weight"):
        bloomify(model, tied="error")
    assert type(model.tok_emb) is nn.Embedding and model.lm_head.weight is model.tok_emb.weight


def test_tiny_lm_untied():
    torch.manual_seed(0)
    model = TinyLM(tie=False)
    before = parameter_bytes(model)
    report = bloomify(model, compression_ratio=0.1, num_hash_functions=2, tied="error")
    assert [r.name for r in report.replaced] == ["tok_emb"]
    assert type(model.tok_emb) is BloomEmbedding and model.tok_emb.weight.shape == (1200, 32)
    assert model.tok_emb.padding_idx is None and model.tok_emb.num_hash_functions == 2
    assert type(model.pos_emb) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert report.replaced[0].bytes_before - report.replaced[0].bytes_after == (12_000 - 1200) * 32 * FLOAT_BYTES
    assert report.model_bytes_after == parameter_bytes(model) == before - (12_000 - 1200) * 32 * FLOAT_BYTES
    first, last = train_lm(model)
    assert last < 0.7 * first


def test_threshold_is_inclusive():
    model = nn.ModuleDict({"at": nn.Embedding(500, 4), "below": nn.Embedding(499, 4)})
    report = bloomify(model, min_num_embeddings=500)
    assert [r.name for r in report.replaced] == ["at"] and [s.name for s in report.skipped] == ["below"]
    assert type(model["at"]) is BloomEmbedding and type(model["below"]) is nn.Embedding


def test_settings_carried_over():
    model = nn.ModuleDict(
        {
            "emb": nn.Embedding(1000, 8, padding_idx=-1, sparse=True, dtype=torch.bfloat16),
            "bag": nn.EmbeddingBag(1000, 8, mode="sum", sparse=True, dtype=torch.float64),
            "maxbag": nn.EmbeddingBag(1000, 8, mode="max", padding_idx=7),
        }
    )
    bloomify(model, min_num_embeddings=1000, backend="torch")
    emb, bag, maxbag = model["emb"], model["bag"], model["maxbag"]
    assert (emb.padding_idx, emb.sparse, emb.weight.dtype, emb.backend) == (999, True, torch.bfloat16, "torch")
    assert (bag.mode, bag.padding_idx, bag.sparse, bag.weight.dtype) == ("sum", None, True, torch.float64)
    assert (maxbag.mode, maxbag.padding_idx, maxbag.include_last_offset) == ("max", 7, False)
    # nn.EmbeddingBag's calls, per-sample weights included.
    ids = torch.tensor([1, 2, 3, 4])
    out = bag(ids, torch.tensor([0, 1]), per_sample_weights=torch.rand(4, dtype=torch.float64))
    out.sum().backward()
    assert out.shape == (2, 8) and bag.weight.grad.layout == torch.sparse_coo
    assert maxbag(ids.view(2, 2)).shape == (2, 8)


@pytest.mark.parametrize(
    "module, reason",
    [
        (nn.Embedding(1000, 4, max_norm=1.0), "max_norm=1.0"),
        (nn.EmbeddingBag(1000, 4, scale_grad_by_freq=True), "scale_grad_by_freq=True"),
        (nn.Embedding.from_pretrained(torch.randn(1000, 4)), "frozen weight"),
    ],
)
def test_unsupported_options(module, reason):
    model = nn.ModuleDict({"odd": module, "plain": nn.Embedding(1000, 4)})
    report = bloomify(model, min_num_embeddings=1000)
    assert [r.name for r in report.replaced] == ["plain"]
    assert report.skipped[0].name == "odd" and reason in report.skipped[0].reason
    assert model["odd"] is module

    model = nn.ModuleDict({"plain": nn.Embedding(1000, 4), "odd": module})
    with pytest.raises(ValueError, match=f"odd .*{reason}"):
        bloomify(model, min_num_embeddings=1000, unsupported="error")
    # Checked before any replacement: the model is unchanged.
    assert type(model["plain"]) is nn.Embedding


def test_subclass_overriding_forward_is_skipped():
    class Shifted(nn.Embedding):
        def forward(self, input):
            return super().forward(input + 1)

    model = nn.Sequential(Shifted(1000, 4))
    report = bloomify(model, min_num_embeddings=1)
    assert report.replaced == [] and "overrides forward" in report.skipped[0].reason


def test_shared_module_replaced_once_under_every_name():
    shared = nn.Embedding(1000, 4)
    model = nn.Module()
    model.encoder = nn.Sequential(shared)
    model.decoder = nn.Sequential(shared)
    report = bloomify(model, min_num_embeddings=1000)
    assert len(report.replaced) == 1 and report.replaced[0].aliases == ("decoder.0",)
    assert type(model.encoder[0]) is BloomEmbedding and model.encoder[0] is model.decoder[0]
    assert report.model_bytes_after == parameter_bytes(model)


def test_filter_fn_and_idempotence():
    model = nn.ModuleDict({"a": nn.Embedding(1000, 4), "b": nn.Embedding(1000, 4)})
    report = bloomify(model, min_num_embeddings=1000, filter_fn=lambda module, name: name != "b")
    assert [r.name for r in report.replaced] == ["a"]
    assert [(s.name, s.reason) for s in report.skipped] == [("b", "excluded by filter_fn")]
    # A second pass leaves Bloom modules (and their inner tables) alone.
    again = bloomify(model, min_num_embeddings=1)
    assert [r.name for r in again.replaced] == ["b"] and again.skipped == []
    assert type(model["a"].embeddings) is not BloomEmbedding


def test_rejects_bad_arguments():
    model = nn.Sequential(nn.Embedding(10, 2))
    with pytest.raises(ValueError, match="model is itself"):
        bloomify(nn.Embedding(20_000, 2))
    with pytest.raises(ValueError, match="compression_ratio"):
        bloomify(model, compression_ratio=0)
    with pytest.raises(ValueError):
        bloomify(model, num_hash_functions=25)
    with pytest.raises(ValueError, match="tied"):
        bloomify(model, tied="untie")
    with pytest.raises(ValueError, match="unsupported"):
        bloomify(model, unsupported="ignore")
    with pytest.raises(ValueError, match="min_num_embeddings"):
        bloomify(model, min_num_embeddings=-1)
    # Too few rows left after compression: skipped with the reason, not an error.
    report = bloomify(model, compression_ratio=0.05, min_num_embeddings=1)
    assert report.replaced == [] and "leaves 0 rows" in report.skipped[0].reason
