"""Calibration of the planner's open-id rule: library layouts against
quotient-remainder on the open-id demo's calibration data only (data seed 0
at ``--quick`` sizes), at the demo's budget with everything counted.

Each layout is trained as the demo trains it (one pass, in-batch sampled
softmax, SparseAdam; Adam for importance weights, whose gradient is dense),
its learning rate picked from the demo's grid on the validation split, and
this is repeated for several initial seeds on the same data, so that a
candidate's lead is not one initialisation's luck.  Held-out seeds are never
read here.

Run from the repository root: ``python -m bench.studies.demo_open_candidates
--threads 1 --inits 2 --out bench/results/demo_open_cpu_calibration.json``
(about 6 min of CPU on one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn as nn

from triton_bloom import BloomEmbedding, embedding_bytes
from triton_bloom.demo_layers import ROW_INDEX_BYTES, QuotientRemainderEmbedding, VocabularyEmbedding, top_ids
from triton_bloom.demo_open import BYTES_PER_ID, EMBEDDING_DIM, LEARNING_RATES, evaluate, train
from triton_bloom.demo_stream import QUICK, eval_set, make_stream
from triton_bloom.terminal import cpu_model


class HotQuotientRemainder(nn.Module):
    """Not a library layout: private rows for ``hot_ids`` and a
    quotient-remainder tail for every other id (what a proposal would add)."""

    def __init__(self, hot_ids, num_quotient, num_remainder, dim, sparse=False):
        super().__init__()
        self.register_buffer("hot_ids", torch.sort(hot_ids).values)
        self.hot = nn.Embedding(hot_ids.numel(), dim, sparse=sparse)
        nn.init.normal_(self.hot.weight, 0.0, 1.0 / dim)
        self.tail = QuotientRemainderEmbedding(num_quotient, num_remainder, dim, sparse=sparse)

    def forward(self, input):
        where = torch.searchsorted(self.hot_ids, input).clamp_(max=self.hot_ids.numel() - 1)
        is_hot = self.hot_ids[where] == input
        out = input.new_zeros(*input.shape, self.hot.embedding_dim, dtype=self.hot.weight.dtype)
        out[is_hot] = self.hot(where[is_hot])
        out[~is_hot] = self.tail(input[~is_hot])
        return out


def candidates(ids, counts, d, budget):
    row = 4 * d
    rows = budget // row
    repeated = int((counts >= 2).sum())

    def hot_split(share, extra=0):
        """Hot ids (counted twice or more) for ``share`` of the budget, shared rows for the rest minus ``extra`` B."""
        hot = min(int(share * budget) // (row + ROW_INDEX_BYTES), repeated)
        return top_ids(ids, counts, hot), (budget - extra - hot * (row + ROW_INDEX_BYTES)) // row

    def bloom(share, k=2, **kw):
        imp = kw.pop("importance_share", 0.0)
        extra = int(imp * budget)
        hot_ids, shared = hot_split(share, extra)
        if imp:
            kw.update(importance=True, importance_rows=extra // (4 * k))
        return lambda sparse: BloomEmbedding(
            None,
            d,
            num_rows=shared,
            num_hash_functions=k,
            padding_idx=None,
            sparse=sparse,
            hot_ids=hot_ids if hot_ids.numel() else None,
            **kw,
        )

    def hot_qr(share):
        hot_ids, shared = hot_split(share)
        return lambda sparse: HotQuotientRemainder(hot_ids, shared // 2, shared - shared // 2, d, sparse=sparse)

    vocab = (budget - row) // (row + ROW_INDEX_BYTES)
    vocabulary = top_ids(ids, counts, vocab)
    out = {
        "vocab": lambda sparse: VocabularyEmbedding(vocabulary, d, sparse=sparse),
        "hashing trick k=1": lambda sparse: BloomEmbedding(
            None, d, num_rows=rows, num_hash_functions=1, padding_idx=None, sparse=sparse
        ),
        "quotient-remainder": lambda sparse: QuotientRemainderEmbedding(rows // 2, rows - rows // 2, d, sparse=sparse),
    }
    for share in (0.5, 0.75, 0.9):
        out[f"hot {share:.0%} + Bloom k=2"] = bloom(share)
        out[f"hot {share:.0%} + Bloom k=2 signed"] = bloom(share, signed=True)
    out["hot 50% + Bloom k=3"] = bloom(0.5, k=3)
    out["hot 75% + Bloom k=3"] = bloom(0.75, k=3)
    out["hot 50% + Bloom k=2 importance 6%"] = bloom(0.5, importance_share=0.06)
    out["hot 50% + Bloom k=2 importance 25%"] = bloom(0.5, importance_share=0.25)
    out["hot 50% + Bloom k=2 signed importance 25%"] = bloom(0.5, signed=True, importance_share=0.25)
    out["hot 50% + quotient-remainder (not in the library)"] = hot_qr(0.5)
    out["hot 75% + quotient-remainder (not in the library)"] = hot_qr(0.75)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inits", type=int, default=2, help="initial seeds per layout")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="labels to run (default all)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed, config = 0, QUICK  # the calibration data; held-out seeds are never read here
    started = time.time()
    load = os.getloadavg()[0]
    stream = make_stream(config, seed)
    ids, counts = stream.train_counts()
    events = stream.split("train")
    valid = eval_set(stream, "valid", config.eval_events // 2, seed + 1)
    test = eval_set(stream, "test", config.eval_events, seed + 2)
    budget = BYTES_PER_ID * ids.numel()
    d = EMBEDDING_DIM
    specs = candidates(ids, counts, d, budget)
    print(f"{ids.numel():,} training ids, budget {budget:,} B; {cpu_model()}, load {load:.2f}", flush=True)
    results = {}
    for label, build in specs.items():
        if args.only and label not in args.only:
            continue
        per_init = []
        for init in range(args.inits):
            runs = []
            for lr in LEARNING_RATES:
                torch.manual_seed(100 + init)
                layer = build(True)
                size = embedding_bytes(layer)
                assert size <= budget, (label, size, budget)
                train(layer, stream, events, lr)
                runs.append(dict(lr=lr, valid=evaluate(layer, valid), test=evaluate(layer, test), bytes=size))
            best = max(runs, key=lambda r: r["valid"]["hr@10"])
            per_init.append(dict(lr=best["lr"], bytes=best["bytes"], **best["test"]))
        mean = {
            m: statistics.fmean(r[m] for r in per_init)
            for m in ("hr@10", "hr@10_head", "hr@10_rare", "auc", "auc_head")
        }
        results[label] = dict(mean=mean, inits=per_init)
        print(
            f"{label:52s} {per_init[0]['bytes']:>8,} B  lr {','.join(str(r['lr']) for r in per_init):10s} "
            + "  ".join(f"{m} {v:.4f}" for m, v in mean.items()),
            flush=True,
        )
    payload = dict(
        seed=seed,
        config="QUICK",
        budget_bytes=budget,
        learning_rates=list(LEARNING_RATES),
        inits=args.inits,
        results=results,
        cpu=cpu_model(),
        torch=torch.__version__,
        threads=args.threads,
        load_start=load,
        load_end=os.getloadavg()[0],
        wall_seconds=time.time() - started,
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
