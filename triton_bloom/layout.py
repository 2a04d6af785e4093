"""A Bloom table's layout, checked and measured: its sizes (a positive int,
the rows of the compressed table), its hot-id set, and what it costs in
bytes.  Below the modules, the output side and the planner, which all use
them, so that none of them has to import another for these."""

from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["positive_int", "compressed_rows", "sorted_hot_ids", "embedding_bytes"]


def positive_int(name: str, value) -> int:
    """``value`` if it is a positive int (not a bool), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def compressed_rows(num_embeddings: Optional[int], compression_ratio: float, num_rows: Optional[int]) -> int:
    """Rows of the compressed table: ``num_rows`` if given, else Spotlight's
    ``int(compression_ratio * num_embeddings)``; ``ValueError`` below one row."""
    if num_rows is not None:
        return positive_int("num_rows", num_rows)
    if num_embeddings is None:
        raise ValueError("num_rows is required when num_embeddings is None")
    if not compression_ratio > 0:
        raise ValueError(f"compression_ratio must be positive, got {compression_ratio!r}")
    rows = int(compression_ratio * num_embeddings)
    if rows < 1:
        raise ValueError(
            f"compression_ratio={compression_ratio} of num_embeddings={num_embeddings} "
            f"leaves {rows} rows; the table needs at least one"
        )
    return rows


def sorted_hot_ids(hot_ids, num_embeddings: Optional[int], padding_idx: Optional[int], device) -> torch.Tensor:
    """``hot_ids`` checked (distinct ids in range, not the padding id) and
    sorted, in the narrowest integer type: the hot set as the kernels search it."""
    hot = torch.as_tensor(hot_ids, device=device)
    if hot.dim() != 1 or hot.is_floating_point() or hot.dtype == torch.bool or hot.is_complex():
        raise TypeError(
            f"hot_ids must be a 1-D tensor of integer ids, got dtype {hot.dtype} and shape {tuple(hot.shape)}"
        )
    hot = torch.sort(hot.to(torch.int64)).values
    if hot.numel():
        low, high = int(hot[0]), int(hot[-1])
        if low < 0 or (num_embeddings is not None and high >= num_embeddings):
            bad = low if low < 0 else high
            raise IndexError(f"hot id {bad} is out of range for num_embeddings={num_embeddings}")
        repeated = hot[1:] == hot[:-1]
        if bool(repeated.any()):
            raise ValueError(f"hot_ids must be distinct, but id {int(hot[1:][repeated][0])} repeats")
        if padding_idx is not None and bool((hot == padding_idx).any()):
            raise ValueError(f"hot_ids must not hold padding_idx={padding_idx}: it reads no row")
    if num_embeddings is not None and num_embeddings <= 2**31:
        hot = hot.to(torch.int32)
    return hot


def check_checkpoint_hot_ids(module: nn.Module, state_dict, prefix: str) -> None:
    """Refuse a checkpoint whose ``hot_ids`` (of ``module``'s shape) are no
    valid hot set for ``module``: the kernels binary-search the hot ids, so
    they must be a sorted set of ids in range, or ids would read other rows.
    Called from ``_load_from_state_dict`` before anything is copied (the
    submodules load after their parent), so the module keeps its own state."""
    hot = state_dict.get(prefix + "hot_ids")
    mine = module.hot_ids
    if mine is None or not isinstance(hot, torch.Tensor) or hot.shape != mine.shape:
        return
    try:
        valid = torch.equal(
            sorted_hot_ids(hot, module.num_embeddings, module.padding_idx, hot.device).long(), hot.long()
        )
        problem = "" if valid else "they are not sorted"
    except (TypeError, ValueError, IndexError) as error:
        problem = str(error)
    if problem:
        raise ValueError(f"{prefix}hot_ids of the checkpoint are not a valid hot set: {problem}")


def embedding_bytes(module: nn.Module) -> int:
    r"""Bytes of every parameter and buffer of ``module`` (each tensor counted
    once): what an embedding layer costs in memory, hot-id index, importance
    weights, private part and hash cache included, optimizer state excluded.

    Examples::

        >>> embedding_bytes(torch.nn.Embedding(1000, 32))
        128000
        >>> embedding_bytes(BloomEmbedding(1000, 32, compression_ratio=0.2))
        25600
    """
    seen, total = set(), 0
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


class WholeCheckpointLoad:
    """``load_state_dict`` that refuses a checkpoint before copying anything,
    for the Bloom modules and their quantized forms alike (they check their
    hash specification, and format, in ``set_extra_state``).
    ``_EXTRA_STATE_REQUIRED``: what the extra state holds, when a strict load
    must find it (a quantized checkpoint is nothing without its format)."""

    _EXTRA_STATE_REQUIRED: Optional[str] = None

    def _check_checkpoint(self, state_dict, prefix: str, strict: bool) -> None:
        """Raise, before anything is copied, unless this module's part of
        ``state_dict`` loads whole.  PyTorch's loader copies each tensor as it
        comes and reports a refused extra state, missing or unexpected keys
        and size mismatches only after copying the rest: a failed load would
        leave the module half loaded.  A dtype mismatch is refused too (the
        loader would cast silently): convert the module or the checkpoint."""
        extra_key = prefix + "_extra_state"
        if extra_key in state_dict:
            self.set_extra_state(state_dict[extra_key])  # compares only: ValueError naming each difference
        elif strict and self._EXTRA_STATE_REQUIRED:
            raise ValueError(
                f"the checkpoint has no {extra_key} ({self._EXTRA_STATE_REQUIRED}): it is not a {type(self).__name__}'s"
            )
        mine = {key: value for key, value in self.state_dict(prefix=prefix, keep_vars=True).items() if key != extra_key}
        problems = []
        for key, tensor in mine.items():
            saved = state_dict.get(key)
            if key not in state_dict:
                if strict:
                    problems.append(f"missing key {key}")
            elif not isinstance(saved, torch.Tensor):
                problems.append(f"{key} is a {type(saved).__name__}, not a tensor")
            elif saved.shape != tensor.shape:
                problems.append(
                    f"size mismatch for {key}: the checkpoint's shape is {tuple(saved.shape)}, "
                    f"the module's {tuple(tensor.shape)}"
                )
            elif saved.dtype != tensor.dtype:
                problems.append(
                    f"dtype mismatch for {key}: the checkpoint's is {saved.dtype}, the module's {tensor.dtype}"
                )
        if strict:
            problems += [
                f"unexpected key {key}"
                for key in state_dict
                if key.startswith(prefix) and key not in mine and key != extra_key
            ]
        if problems:
            raise RuntimeError(
                f"the checkpoint does not fit this {type(self).__name__}, so nothing was loaded: " + "; ".join(problems)
            )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # PyTorch's loader tells _load_from_state_dict nothing of `strict`
        # (it always passes True): the keys are checked here, up front.
        if strict:
            self._check_checkpoint(state_dict, "", strict=True)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
