"""``bloomify``: swap a model's large ``nn.Embedding`` / ``nn.EmbeddingBag``
tables for ``BloomEmbedding`` / ``BloomEmbeddingBag`` in place, and report
what changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import dispatch
from .checks import WEIGHT_DTYPES
from .hashing import check_num_hash_functions
from .modules import BloomEmbedding, BloomEmbeddingBag, compressed_rows

__all__ = ["bloomify", "BloomifyReport", "ReplacedModule", "SkippedModule"]

DEFAULT_MIN_NUM_EMBEDDINGS = 10_000

_CHOICES = ("skip", "error")
_TIED_CHOICES = ("skip", "error", "share")


@dataclass(frozen=True)
class ReplacedModule:
    """One table ``bloomify`` compressed.

    Attributes:
        name (str): the module's path in the model (``named_modules`` style).
        aliases (tuple of str): other paths of the same module object, which
            now hold the same Bloom module.
        before (str), after (str): short descriptions of the old and new module.
        bytes_before (int), bytes_after (int): the module's bytes
            (parameters and buffers, as :func:`~triton_bloom.embedding_bytes`).
    """

    name: str
    before: str
    after: str
    bytes_before: int
    bytes_after: int
    aliases: Tuple[str, ...] = ()


@dataclass(frozen=True)
class SkippedModule:
    """An ``nn.Embedding`` / ``nn.EmbeddingBag`` left as it was, and why.

    Attributes:
        name (str): the module's path in the model.
        module (str): a short description of the module.
        reason (str): why it was not replaced.
        bytes (int): its parameter bytes, unchanged.
    """

    name: str
    module: str
    reason: str
    bytes: int


@dataclass
class BloomifyReport:
    """What :func:`bloomify` did to a model.

    Attributes:
        replaced (list of ReplacedModule): the compressed tables.
        skipped (list of SkippedModule): the embedding tables left alone, with reasons.
        model_bytes_before (int), model_bytes_after (int): all the model's
            parameter bytes (each shared parameter counted once) before and after.

    ``str(report)`` is a readable summary, one line per table.
    """

    replaced: List[ReplacedModule] = field(default_factory=list)
    skipped: List[SkippedModule] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0

    @property
    def bytes_before(self) -> int:
        """Parameter bytes of the replaced tables before."""
        return sum(r.bytes_before for r in self.replaced)

    @property
    def bytes_after(self) -> int:
        """Parameter bytes of their Bloom replacements."""
        return sum(r.bytes_after for r in self.replaced)

    @property
    def bytes_saved(self) -> int:
        return self.model_bytes_before - self.model_bytes_after

    def __str__(self) -> str:
        tables = len(self.replaced) + len(self.skipped)
        lines = [
            f"bloomify: replaced {len(self.replaced)} of {tables} embedding tables: "
            f"{_format_bytes(self.bytes_before)} -> {_format_bytes(self.bytes_after)}; model parameters "
            f"{_format_bytes(self.model_bytes_before)} -> {_format_bytes(self.model_bytes_after)}"
            + (f" ({self.model_bytes_after / self.model_bytes_before:.1%})" if self.model_bytes_before else "")
        ]
        width = max((len(entry.name) for entry in [*self.replaced, *self.skipped]), default=0)
        for r in self.replaced:
            also = f" (also {', '.join(r.aliases)})" if r.aliases else ""
            lines.append(
                f"  replaced  {r.name:<{width}}  {r.before} -> {r.after}: "
                f"{_format_bytes(r.bytes_before)} -> {_format_bytes(r.bytes_after)}{also}"
            )
        for s in self.skipped:
            lines.append(f"  skipped   {s.name:<{width}}  {s.module}: {s.reason}")
        return "\n".join(lines)


def bloomify(
    model: nn.Module,
    compression_ratio: float = 0.2,
    num_hash_functions: int = 4,
    *,
    min_num_embeddings: int = DEFAULT_MIN_NUM_EMBEDDINGS,
    tied: str = "skip",
    unsupported: str = "skip",
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    backend: str = "auto",
    table_options: Optional[Dict[str, dict]] = None,
) -> BloomifyReport:
    r"""Replace, in place, every large :class:`torch.nn.Embedding` and
    :class:`torch.nn.EmbeddingBag` of ``model`` by a
    :class:`~triton_bloom.BloomEmbedding` / :class:`~triton_bloom.BloomEmbeddingBag`
    with the same call signature and a table ``compression_ratio`` times smaller.

    The replacement keeps what the forward depends on: ``num_embeddings``,
    ``embedding_dim``, ``padding_idx`` (exactly, ``None`` included: the Bloom
    modules' own default of 0 is not applied), ``sparse``, the weight's
    ``dtype`` and ``device``, and for bags ``mode`` and
    ``include_last_offset``.  Its table is freshly initialised (trained rows
    cannot be carried into a hashed table), so call ``bloomify`` on a model
    before training it, before building its optimizer, and before wrapping it
    (``torch.compile``, DDP, FSDP).  The state-dict key of a replaced table
    becomes ``<name>.embeddings.weight``.

    Tables are left alone, and listed in the report with the reason, when:

    - they have fewer than ``min_num_embeddings`` rows: small tables cost
      little memory and gain nothing from hashing but collisions;
    - their weight is **tied** to another module (the same ``Parameter`` is
      also, say, a language model's output projection): a Bloom table has
      fewer rows than the vocabulary, so the tie cannot survive, and keeping
      a dense copy for the other user would grow the model, not shrink it.
      ``tied="error"`` raises instead;
    - they use what Bloom modules do not support: ``max_norm`` (renormalises
      looked-up rows in place), ``scale_grad_by_freq``, a frozen weight
      (``requires_grad=False``, presumably pretrained values a Bloom table
      cannot hold), a parametrized weight, a ``dtype`` outside float32/64,
      float16, bfloat16, or a subclass that overrides ``forward``.
      ``unsupported="error"`` raises instead;
    - ``filter_fn(module, name)`` returns ``False``.

    Every check runs before the first module is replaced, so an error leaves
    ``model`` unchanged.  A module registered under several names is
    replaced by one Bloom module under all of them.

    Args:
        model (nn.Module): the model, modified in place. It cannot itself be
            an ``nn.Embedding`` / ``nn.EmbeddingBag`` (there is no parent to
            put the replacement in): use the Bloom module directly.
        compression_ratio (float): each Bloom table has
            ``int(compression_ratio * num_embeddings)`` rows. Default: 0.2.
        num_hash_functions (int): ``k``, rows summed per id (1 to 24). Default: 4.
        min_num_embeddings (int): tables with fewer rows are left alone.
            Default: 10_000.
        tied (str): ``"skip"`` (default), ``"error"`` or ``"share"``, for
            tables whose weight is shared with another module.  ``"share"``
            converts an embedding tied to one ``nn.Linear`` output layer (a
            language model's head): the embedding becomes a Bloom table and
            the head a :class:`~triton_bloom.TiedBloomLinear` scoring every
            id against the same table (its bias kept); other ties are skipped.
        unsupported (str): ``"skip"`` (default) or ``"error"``, for tables
            using options the Bloom modules do not support.
        filter_fn (callable, optional): ``filter_fn(module, name) -> bool``;
            only modules it accepts are replaced.
        backend (str): the Bloom modules' ``backend``: ``"auto"``, ``"triton"``
            or ``"torch"``. Default: ``"auto"``.
        table_options (dict, optional): per table, by its name in
            ``model.named_modules()``, more constructor arguments of its Bloom
            module, overriding the shared ones: ``num_rows``,
            ``num_hash_functions``, ``hot_ids`` (its frequent ids),
            ``private_dim``, ``signed``, ``importance``, ``fused_optimizer``...
            The call signature's own (``num_embeddings``, ``embedding_dim``,
            ``padding_idx``, ``sparse``, ``mode``) cannot be overridden.

    Returns:
        BloomifyReport: the replaced tables with their parameter bytes before
        and after, the skipped ones with reasons, and the model's totals.

    Raises:
        ValueError: for a bad argument, a tied table with ``tied="error"``, or
            an unsupported one with ``unsupported="error"``.

    Examples::

        >>> model = nn.ModuleDict({"users": nn.Embedding(100_000, 32), "genres": nn.Embedding(30, 32)})
        >>> report = bloomify(model, compression_ratio=0.2, num_hash_functions=4)
        >>> type(model["users"]).__name__, model["users"].weight.shape, model["users"].padding_idx
        ('BloomEmbedding', torch.Size([20000, 32]), None)
        >>> print(report)
        bloomify: replaced 1 of 2 embedding tables: 12.2 MiB -> 2.4 MiB; model parameters 12.2 MiB -> 2.4 MiB (20.0%)
          replaced  users   Embedding(100000, 32) -> BloomEmbedding(100000, 32, num_rows=20000, k=4): 12.2 MiB -> 2.4 MiB
          skipped   genres  Embedding(30, 32): 30 rows < min_num_embeddings=10000
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.Embedding, nn.EmbeddingBag)):
        raise ValueError(
            f"model is itself an {type(model).__name__}: bloomify replaces submodules in place and a model has no "
            "parent to hold its replacement; construct a BloomEmbedding / BloomEmbeddingBag directly"
        )
    if not compression_ratio > 0:
        raise ValueError(f"compression_ratio must be positive, got {compression_ratio!r}")
    check_num_hash_functions(num_hash_functions)
    if isinstance(min_num_embeddings, bool) or not isinstance(min_num_embeddings, int) or min_num_embeddings < 0:
        raise ValueError(f"min_num_embeddings must be a non-negative int, got {min_num_embeddings!r}")
    for name, value, choices in (("tied", tied, _TIED_CHOICES), ("unsupported", unsupported, _CHOICES)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    dispatch.check_backend(backend)
    table_options = dict(table_options or {})
    known = {name for names in _embedding_modules(model).values() for name in names}
    for name, options in table_options.items():
        if name not in known:
            raise ValueError(f"table_options names {name!r}, which is no nn.Embedding / nn.EmbeddingBag of the model")
        fixed = sorted(set(options) & _SIGNATURE)
        if fixed:
            raise ValueError(
                f"table_options[{name!r}] cannot override {fixed}: the replacement keeps the table's call signature"
            )

    model_bytes_before = _parameter_bytes(model)
    owners = _parameter_owners(model)
    report = BloomifyReport()
    swaps: List[Tuple[List[str], nn.Module]] = []
    for module, names in _embedding_modules(model).items():
        name = names[0]
        description = _describe(module)
        nbytes = _parameter_bytes(module)
        reason = None
        if filter_fn is not None and not filter_fn(module, name):
            reason = "excluded by filter_fn"
        elif module.num_embeddings < min_num_embeddings:
            reason = f"{module.num_embeddings} rows < min_num_embeddings={min_num_embeddings}"
        else:
            tie = _tie(module, owners)
            head = _tied_output_layer(module, owners) if tie is not None and tied == "share" else None
            if tie is not None and head is None:
                reason = f"weight tied to {tie}: a Bloom table cannot keep the tie"
                if tied == "share":
                    reason += " (tied='share' converts only a tie with one nn.Linear of its shape)"
                if tied == "error":
                    raise ValueError(f"bloomify: {name} ({description}): {reason} (pass tied='skip' to leave it dense)")
            else:
                reason = _unsupported(module)
                if reason is not None and unsupported == "error":
                    raise ValueError(
                        f"bloomify: {name} ({description}): {reason} (pass unsupported='skip' to leave it dense)"
                    )
            if reason is None:
                try:
                    compressed_rows(module.num_embeddings, compression_ratio, None)
                except ValueError as exc:
                    reason = str(exc)
        if reason is not None:
            report.skipped.append(SkippedModule(name, description, reason, nbytes))
            continue
        options = next((table_options[n] for n in names if n in table_options), {})
        bloom = _bloom_twin(module, compression_ratio, num_hash_functions, backend, options)
        swaps.append((names, bloom))
        if head is not None:
            from .output import TiedBloomLinear

            linear, linear_names = head
            swaps.append((linear_names, TiedBloomLinear(bloom, linear.bias)))
        report.replaced.append(
            ReplacedModule(name, description, _describe(bloom), nbytes, _parameter_bytes(bloom), tuple(names[1:]))
        )

    for names, bloom in swaps:
        for path in names:
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name), child, bloom)
    report.model_bytes_before = model_bytes_before
    report.model_bytes_after = _parameter_bytes(model)
    return report


# What the Bloom twin takes from the table it replaces, never from table_options.
_SIGNATURE = {"num_embeddings", "embedding_dim", "padding_idx", "sparse", "mode", "include_last_offset"}


def _bloom_twin(module, compression_ratio, num_hash_functions, backend, options):
    """The Bloom module with ``module``'s call signature (not its values),
    with ``options`` (its ``table_options``) added."""
    common = dict(
        num_embeddings=module.num_embeddings,
        embedding_dim=module.embedding_dim,
        compression_ratio=compression_ratio,
        num_hash_functions=num_hash_functions,
        # Exactly the source's, None included: BloomEmbedding's own default is 0.
        padding_idx=module.padding_idx,
        backend=backend,
        sparse=module.sparse,
        device=module.weight.device,
        dtype=module.weight.dtype,
    )
    common.update(options)
    if isinstance(module, nn.EmbeddingBag):
        return BloomEmbeddingBag(mode=module.mode, include_last_offset=module.include_last_offset, **common)
    return BloomEmbedding(**common)


def _embedding_modules(model: nn.Module) -> Dict[nn.Module, List[str]]:
    """Each candidate module with every name it is registered under, in
    ``named_modules`` order; tables inside Bloom modules (already compressed)
    are not candidates."""
    found: Dict[nn.Module, List[str]] = {}
    bloom_prefixes: List[str] = []  # "" for a Bloom root: everything is inside it
    for name, module in model.named_modules(remove_duplicate=False):
        if any(prefix == "" or name.startswith(prefix + ".") for prefix in bloom_prefixes):
            continue
        if isinstance(module, (BloomEmbedding, BloomEmbeddingBag)):
            bloom_prefixes.append(name)
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            found.setdefault(module, []).append(name)
    return found


def _parameter_owners(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """Every registered parameter (by id) with the modules and attribute names holding it."""
    owners: Dict[int, List[Tuple[nn.Module, str]]] = {}
    seen = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            continue
        seen.add(id(module))
        for attr, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, f"{prefix}.{attr}" if prefix else attr))
    return owners


def _tied_output_layer(module: nn.Module, owners):
    """``(linear, its names)`` when ``module``'s weight is shared with exactly
    one ``nn.Linear`` of the same shape (an output layer tied to the
    embedding, as in language models), else ``None``."""
    others = [(other, name) for other, name in owners.get(id(module.weight), ()) if other is not module]
    linears = {id(other): other for other, _ in others}
    if len(linears) != 1:
        return None
    linear = next(iter(linears.values()))
    if type(linear) is not nn.Linear or tuple(linear.weight.shape) != tuple(module.weight.shape):
        return None
    if not isinstance(module, nn.Embedding):
        return None
    names = [name.rpartition(".")[0] for other, name in others if name.endswith(".weight") or name == "weight"]
    return linear, names


def _tie(module: nn.Module, owners) -> Optional[str]:
    """The name of another module's parameter sharing ``module``'s weight, if any."""
    for other, name in owners.get(id(module.weight), ()):
        if other is not module:
            return name
    return None


def _unsupported(module: nn.Module) -> Optional[str]:
    """Why the Bloom modules cannot stand in for ``module``, or ``None``."""
    base = nn.EmbeddingBag if isinstance(module, nn.EmbeddingBag) else nn.Embedding
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides forward; its behaviour would be lost"
    if module.max_norm is not None:
        return f"max_norm={module.max_norm} (renormalising looked-up rows) is not supported"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq=True is not supported"
    if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
        return "a parametrized weight is not supported"
    if not module.weight.requires_grad:
        return "frozen weight (requires_grad=False): its values presumably matter and a Bloom table cannot hold them"
    if module.weight.dtype not in WEIGHT_DTYPES:
        return f"weight dtype {module.weight.dtype} is not supported"
    return None


def _parameter_bytes(module: nn.Module) -> int:
    # Buffers too: a Bloom module's hot-id index is memory its table needs.
    # Each tensor counts once, so tied weights count once.
    from .modules import embedding_bytes

    return embedding_bytes(module)


def _describe(module: nn.Module) -> str:
    if isinstance(module, (BloomEmbedding, BloomEmbeddingBag)):
        s = f"{type(module).__name__}({module.num_embeddings}, {module.embedding_dim}, num_rows={module.num_rows}"
        s += f", k={module.num_hash_functions}"
    else:
        s = f"{type(module).__name__}({module.num_embeddings}, {module.embedding_dim}"
    if isinstance(module, (nn.EmbeddingBag, BloomEmbeddingBag)):
        s += f", mode={module.mode!r}"
    return s + ")"


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
