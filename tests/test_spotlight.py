"""Spotlight compatibility: a Spotlight BloomEmbedding checkpoint loads into
ours and gives the same outputs and gradients.

``SpotlightBloomEmbedding`` (``bench/baselines.py``, the baseline the
benchmarks time) re-derives the seed's computation from its text:
scikit-learn hashes of every id, the padding id's hashes forced to row 0, an
``nn.Embedding`` with ``padding_idx`` as the table, a gather and a sum over k.
It shares no code with the package.
"""

import pytest
import torch
from support import DEVICE

from bench.baselines import SpotlightBloomEmbedding
from triton_bloom import BloomEmbedding

CASES = [(1000, 8, 0.2, 4), (5000, 3, 0.05, 1), (777, 17, 0.5, 7), (20000, 4, 0.1, 24), (300, 32, 1.0, 2)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_spotlight_checkpoint_gives_same_outputs_and_gradients(case, backend):
    num_embeddings, dim, ratio, k = CASES[case]
    torch.manual_seed(case)
    seed_model = SpotlightBloomEmbedding(num_embeddings, dim, ratio, k)
    ours = BloomEmbedding(num_embeddings, dim, ratio, k, backend=backend)
    ours.load_state_dict(seed_model.state_dict())
    ours.to(DEVICE)

    ids = torch.randint(0, num_embeddings, (16, 5))
    ids[0, :2] = 0  # the padding id
    expected = seed_model(ids)
    out = ours(ids.to(DEVICE))
    assert out.shape == expected.shape
    torch.testing.assert_close(out.cpu(), expected, atol=1e-6, rtol=1e-5)

    # 1-D input: Spotlight gives (batch, 1, dim); a model's .squeeze() agrees.
    flat = ids[:, 0]
    torch.testing.assert_close(ours(flat.to(DEVICE)).cpu(), seed_model(flat).squeeze(1), atol=1e-6, rtol=1e-5)

    grad_out = torch.randn(expected.shape)
    expected.backward(grad_out)
    out.backward(grad_out.to(DEVICE))
    # Spotlight froze row 0 (its padding row); every other row's gradient matches.
    torch.testing.assert_close(ours.weight.grad[1:].cpu(), seed_model.embeddings.weight.grad[1:], atol=1e-5, rtol=1e-5)
