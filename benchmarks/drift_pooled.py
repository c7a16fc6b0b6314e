"""Pool long_rollout.py runs over several bases and check issue 17's acceptance point on the pooled figures.

    python benchmarks/drift_pooled.py runs/b1/bench16w3/results.json runs/b2/bench16w3/results.json ...

One base's figure is set by one or two captions (a rollout holds its object to the end or loses it), so
the comparison is made on the mean over every rollout of every base: each method's mean per-chunk curve,
weighted by its rollouts per base (exact: the pooled curve is the mean over all rollouts). Every input must
hold the same methods, length and captions. Prints, per method and length (the run's, its first half
and its first quarter: the sampler is causal), the pooled presence and motion first / last quarter / drift with each base's drift, then the point:
last quarter within 10% of the first (``last >= 0.9 first``) for presence and motion, and drift at most half
the baseline's for both, where the baseline drifts (a drift <= 0 leaves nothing to halve).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from long_rollout import CLIP_CHUNKS, chart, summarise

POINT_FIELDS = ("object_present", "motion")


def pool(results: list[dict]) -> dict:
    """``{method: {"curves": pooled mean curves, "rollouts": total}}`` over runs with the same methods."""
    methods = list(results[0]["methods"])
    out = {}
    for name in methods:
        runs = [r["methods"][name] for r in results]
        weights = np.array([r["rollouts"] for r in runs], dtype=float)
        curves = {f: list(np.average([r["curves"][f] for r in runs], axis=0, weights=weights))
                  for f in runs[0]["curves"]}
        out[name] = {"curves": curves, "rollouts": int(weights.sum())}
    return out


def acceptance(pooled_rows: dict, baseline: str) -> dict:
    """``{method: (within_10pct, halved, reason)}`` from ``{method: summarise(...)}`` rows of one length."""
    base = pooled_rows[baseline]
    verdict = {}
    for name, rows in pooled_rows.items():
        if name == baseline:
            continue
        within = all(rows[f][1] >= 0.9 * rows[f][0] for f in POINT_FIELDS)
        drifts = all(base[f][2] > 0 for f in POINT_FIELDS)
        halved = drifts and all(rows[f][2] <= 0.5 * base[f][2] for f in POINT_FIELDS)
        reason = "" if drifts else f"{baseline} does not drift in both fields"
        verdict[name] = (within, halved, reason)
    return verdict


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="long_rollout.py's results.json, one per base")
    p.add_argument("--baseline", default="teacher_forced", help="the method whose drift the others must halve")
    p.add_argument("--chart", default="", help="write the pooled per-chunk curves as long_rollout.py's PNG chart here")
    args = p.parse_args(argv)
    try:
        results = [json.load(open(path)) for path in args.results]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = {(tuple(r["methods"]), r["args"]["length"], r["args"]["captions"]) for r in results}
    if len(keys) != 1:
        print("error: the runs differ in methods, --length or --captions; pool runs of one command per base",
              file=sys.stderr)
        return 2
    if args.baseline not in results[0]["methods"]:
        print(f"error: --baseline {args.baseline} is not one of the runs' methods", file=sys.stderr)
        return 2
    pooled = pool(results)
    length = results[0]["args"]["length"]
    print(f"{len(results)} bases, {pooled[args.baseline]['rollouts']} rollouts per method; drift per base in brackets\n"
          "| method | length | present first / last / drift (per base) | motion first / last / drift (per base) |"
          "\n|---|---|---|---|")
    verdicts = {}
    for ln in sorted({n for n in (length, length // 2, length // 4) if n >= 1}, reverse=True):
        rows = {name: summarise(m["curves"], ln * CLIP_CHUNKS) for name, m in pooled.items()}
        for name, s in rows.items():
            cells = []
            for f in POINT_FIELDS:
                per_base = [summarise(r["methods"][name]["curves"], ln * CLIP_CHUNKS)[f][2] for r in results]
                spread = ", ".join(f"{d * 100:+.0f}" for d in per_base)
                cells.append(f"{s[f][0]:.0%} / {s[f][1]:.0%} / {s[f][2]:+.1%} ({spread})")
            print(f"| {name} | {ln}x | {' | '.join(cells)} |")
        verdicts[f"{ln}x"] = acceptance(rows, args.baseline)
    if args.chart:
        chart(args.chart, pooled, length * CLIP_CHUNKS)
        print(f"\nchart: {args.chart}")
    print()
    for ln, verdict in verdicts.items():
        for name, (within, halved, reason) in verdict.items():
            met = "MET" if within and halved else "not met"
            print(f"{ln} {name}: last quarter within 10% of the first: {'yes' if within else 'no'}; drift at most "
                  f"half of {args.baseline}'s: {'yes' if halved else 'no'}{' (' + reason + ')' if reason else ''}"
                  f" -> {met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
