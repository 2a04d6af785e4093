"""Checkpoints: a round trip through ``torch.save`` / ``torch.load(weights_only=True)``
restores a module bit for bit, and every broken checkpoint (truncated,
shape- or dtype-mismatched, a tampered hash specification, an
``_extra_state`` of an older format or of another library) is refused with
a clear error and leaves the module exactly as it was.

The checkpoints come from another module, initialised differently, and the
tampered ones change every tensor they keep: a load that copied anything
before failing shows up as a changed parameter.
"""

import io

import pytest
import torch
import torch.nn as nn

from triton_bloom import BloomEmbedding, BloomEmbeddingBag

VARIANTS = {
    "plain": {},
    "signed": dict(signed=True),
    "importance": dict(importance=True, importance_rows=5),
    "signed_importance": dict(signed=True, importance=True),
}
CLASSES = {"embedding": BloomEmbedding, "bag": BloomEmbeddingBag}


def make(cls_name, variant, seed, **extra):
    torch.manual_seed(seed)
    module = CLASSES[cls_name](1000, 6, 0.2, 3, num_rows=37, **VARIANTS[variant], **extra)
    if module.importance_weight is not None:  # ones at init: make them tell modules apart
        with torch.no_grad():
            module.importance_weight.uniform_(0.5, 1.5)
    return module


def snapshot(module):
    return {name: value.detach().clone() for name, value in [*module.named_parameters(), *module.named_buffers()]}


def assert_unchanged(module, before):
    after = snapshot(module)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), f"{name} changed by a failed load"


def saved_and_loaded(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("cls_name", sorted(CLASSES))
def test_round_trip_through_torch_save(cls_name, variant):
    source, target = make(cls_name, variant, 0), make(cls_name, variant, 1)
    assert not torch.equal(source.weight, target.weight)
    target.load_state_dict(saved_and_loaded(source.state_dict()))
    assert_unchanged(target, snapshot(source))  # now bit-identical to the source
    ids = torch.tensor([[3, 999, 0], [17, 17, 512]])
    torch.testing.assert_close(target(ids), source(ids), rtol=0, atol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_nested_in_a_model(variant):
    source = nn.Sequential(make("embedding", variant, 0), nn.Linear(6, 2))
    target = nn.Sequential(make("embedding", variant, 1), nn.Linear(6, 2))
    target.load_state_dict(saved_and_loaded(source.state_dict()))
    assert_unchanged(target, snapshot(source))


def _shifted(state):
    """Every tensor changed (ints left alone), so any partial copy would show."""
    return {k: v + 1 if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}


def _spec(state, **changes):
    state = dict(state)
    spec = dict(state["_extra_state"]["hash_spec"])
    for key, value in changes.items():
        if value is None:
            spec.pop(key)
        else:
            spec[key] = value
    state["_extra_state"] = {"hash_spec": spec}
    return state


def _extra(state, extra):
    return {**state, "_extra_state": extra}


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


def _replace(state, key, value):
    return {**state, key: value}


# (name, tampering of a state dict, the variants it applies to, exception, text the message holds)
BROKEN = [
    ("truncated: no table", lambda s: _without(s, "embeddings.weight"), None, RuntimeError, "embeddings.weight"),
    (
        "truncated: no importance weights",
        lambda s: _without(s, "importance_weight"),
        "importance",
        RuntimeError,
        "importance_weight",
    ),
    (
        "truncated: the table cut short",
        lambda s: _replace(s, "embeddings.weight", s["embeddings.weight"][:20]),
        None,
        RuntimeError,
        "(20, 6)",
    ),
    (
        "a row too many",
        lambda s: _replace(s, "embeddings.weight", torch.cat([s["embeddings.weight"], s["embeddings.weight"][:1]])),
        None,
        RuntimeError,
        "size mismatch",
    ),
    (
        "a column too many",
        lambda s: _replace(s, "embeddings.weight", torch.zeros(37, 7)),
        None,
        RuntimeError,
        "(37, 7)",
    ),
    (
        "importance of another k",
        lambda s: _replace(s, "importance_weight", torch.ones(s["importance_weight"].shape[0], 4)),
        "importance",
        RuntimeError,
        "importance_weight",
    ),
    (
        "float64 table",
        lambda s: _replace(s, "embeddings.weight", s["embeddings.weight"].double()),
        None,
        RuntimeError,
        "float64",
    ),
    (
        "bfloat16 table",
        lambda s: _replace(s, "embeddings.weight", s["embeddings.weight"].bfloat16()),
        None,
        RuntimeError,
        "bfloat16",
    ),
    (
        "integer table",
        lambda s: _replace(s, "embeddings.weight", s["embeddings.weight"].long()),
        None,
        RuntimeError,
        "int64",
    ),
    (
        "float64 importance",
        lambda s: _replace(s, "importance_weight", s["importance_weight"].double()),
        "importance",
        RuntimeError,
        "float64",
    ),
    (
        "a list for the table",
        lambda s: _replace(s, "embeddings.weight", s["embeddings.weight"].tolist()),
        None,
        RuntimeError,
        "list",
    ),
    (
        "an unexpected key",
        lambda s: _replace(s, "embeddings.bias", torch.zeros(6)),
        None,
        RuntimeError,
        "embeddings.bias",
    ),
    ("other seeds", lambda s: _spec(s, seeds=[1, 2, 3]), None, ValueError, "seeds"),
    ("other k", lambda s: _spec(s, num_hash_functions=4), None, ValueError, "num_hash_functions"),
    ("other num_rows", lambda s: _spec(s, num_rows=38), None, ValueError, "num_rows"),
    ("other algorithm", lambda s: _spec(s, algorithm="xxhash64"), None, ValueError, "xxhash64"),
    ("a spec key too many", lambda s: _spec(s, salt=7), None, ValueError, "salt"),
    ("a spec key missing", lambda s: _spec(s, reduction=None), None, ValueError, "reduction"),
    ("sign seeds dropped", lambda s: _spec(s, sign_seeds=None), "signed", ValueError, "sign_seeds"),
    ("other importance rows", lambda s: _spec(s, importance_rows=99), "importance", ValueError, "importance_rows"),
    (
        "older format: no hash_spec",
        lambda s: _extra(s, {"version": 1, "seeds": [179424941]}),
        None,
        ValueError,
        "no hash specification",
    ),
    ("another library: a tensor", lambda s: _extra(s, torch.arange(3)), None, ValueError, "no hash specification"),
    ("another library: a string", lambda s: _extra(s, "fbgemm:v2"), None, ValueError, "fbgemm:v2"),
    (
        "another library: hash_spec not a dict",
        lambda s: _extra(s, {"hash_spec": "murmur3"}),
        None,
        ValueError,
        "murmur3",
    ),
    ("no extra state at all", lambda s: _extra(s, None), None, ValueError, "None"),
]


# Each broken checkpoint with every module and variant it applies to.
BROKEN_CASES = [
    pytest.param(cls_name, variant, *broken[1:], id=f"{cls_name}-{variant}-{broken[0]}")
    for broken in BROKEN
    for cls_name in sorted(CLASSES)
    for variant in sorted(VARIANTS)
    if broken[2] is None or broken[2] in variant
]


@pytest.mark.parametrize("cls_name, variant, tamper, needs, error, text", BROKEN_CASES)
def test_broken_checkpoint_is_refused_and_changes_nothing(cls_name, variant, tamper, needs, error, text):
    state = tamper(_shifted(saved_and_loaded(make(cls_name, variant, 0).state_dict())))
    target = make(cls_name, variant, 1)
    before = snapshot(target)
    ids = torch.tensor([5, 6, 7])
    out_before = target(ids) if cls_name == "embedding" else target(ids, torch.tensor([0]))
    with pytest.raises(error) as info:
        target.load_state_dict(state)
    assert text in str(info.value), str(info.value)
    assert_unchanged(target, before)
    out_after = target(ids) if cls_name == "embedding" else target(ids, torch.tensor([0]))
    torch.testing.assert_close(out_after, out_before, rtol=0, atol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_broken_checkpoint_nested_in_a_model_changes_nothing(variant):
    # Inside a model the Bloom module's own tensors stay as they were.
    source = nn.Sequential(make("embedding", variant, 0))
    target = nn.Sequential(make("embedding", variant, 1))
    state = _shifted(source.state_dict())
    state["0.embeddings.weight"] = state["0.embeddings.weight"].double()
    before = snapshot(target)
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        target.load_state_dict(state)
    assert_unchanged(target, before)


def test_non_strict_load_skips_missing_but_still_checks_the_rest():
    target = make("embedding", "importance", 1)
    source = make("embedding", "importance", 0)
    state = _without(source.state_dict(), "importance_weight")
    result = target.load_state_dict(state, strict=False)
    assert result.missing_keys == ["importance_weight"]
    assert torch.equal(target.weight, source.weight)
    before = snapshot(target)
    with pytest.raises(ValueError, match="num_rows"):
        target.load_state_dict(_spec(_shifted(state), num_rows=3), strict=False)
    assert_unchanged(target, before)


def test_truncated_file_is_refused():
    buffer = io.BytesIO()
    torch.save(make("embedding", "importance", 0).state_dict(), buffer)
    data = buffer.getvalue()
    for cut in (len(data) // 2, len(data) - 10, 100):
        # torch's own errors: a zip reader's RuntimeError, or a ValueError from a seek.
        with pytest.raises((RuntimeError, ValueError)):
            torch.load(io.BytesIO(data[:cut]), weights_only=True)
