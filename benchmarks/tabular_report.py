"""The tabular BOND / J-BOND runs of tests/test_bond_algorithm.py, once, as a report and a plot.

The tests assert the outcomes (Monte-Carlo BOND reaches KL(pi || pi_BoN) < 0.02 nats for N = 2 and 4;
J-BOND with an EMA anchor climbs past Best-of-2 and keeps rising); this script prints the numbers behind
those assertions as a markdown block and writes the (mean quantile, KL(pi || pi_ref)) trajectory of J-BOND
against the exact Best-of-N points to a PNG.  CPU only, about a minute on 2 cores:

    python benchmarks/tabular_report.py [--png docs/jbond_tabular.png]
"""

import argparse
import os
import sys
import time

import _common as C
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_bond_algorithm import run_tabular_bond, run_tabular_jbond  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", default="docs/jbond_tabular.png", help="where to write the J-BOND plot")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.time()
    stamp = f"CPU {C.cpu_name()}, torch {torch.__version__}, {C.today()}"
    print(f"### Tabular BOND / J-BOND (64 outcomes, seed {args.seed}) — {stamp}\n")
    print("| run | exact KL(π‖π_BoN) before | after |")
    print("|---|---|---|")
    for n in (2, 4):
        torch.manual_seed(args.seed)
        res = run_tabular_bond(n, seed=args.seed)
        print(
            f"| Monte-Carlo BOND, N = {n}, β = 0.5, 1000 Adam steps | {res['kl_start']:.4f} | {res['kl_end']:.4f} |"
        )
    torch.manual_seed(args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    res = run_tabular_jbond(seed=args.seed, plot_path=args.png)
    fin, q, kl = res["final"], res["quantile"], res["kl_to_ref"]
    print()
    print("| J-BOND step | exact mean quantile under π_ref | exact KL(π‖π_ref) |")
    print("|---|---|---|")
    for i in sorted({0, 25, 50, 100, 150, len(q) - 1}):
        print(f"| {i + 1} | {q[i]:.3f} | {kl[i]:.3f} |")
    print(
        f"\nJ-BOND (β = 0.5, EMA η = 0.02, {fin['steps']} steps): quantile {fin['quantile_start']:.3f} → "
        f"{fin['quantile']:.3f} at KL {fin['kl_to_ref']:.3f} nats; Best-of-{fin['best_of_n_matching_quantile']} "
        f"of π_ref reaches that quantile at KL {fin['kl_of_that_best_of_n']:.3f}.  Plot: {args.png} "
        f"({time.time() - t0:.0f} s in all)."
    )


if __name__ == "__main__":
    main()
