"""CPU benchmark of the TRL / verl drop-ins against the peers' own functions: time and peak extra memory.

Forward + backward of per-token log-probs (TRL's ``selective_log_softmax``, verl's ``logprobs_from_logits``)
and of the entropy (``entropy_from_logits``, forward only as in the trainers' metrics) on (B, T, V) =
(4, 512, 32000) fp32 logits with a random upstream gradient.  Peers: the installed trl / verl (pinned in
tests/requirements-peers.txt); on CPU they run their eager torch paths.  Memory: peak extra resident size of
one call (``test_bench_cpu.peak_extra_bytes``).

Run: ``python benchmarks/test_bench_cpu_integrations.py`` (the table of BENCHMARKS.md).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from test_bench_cpu import cpu_model, peak_extra_bytes, round_robin_ms  # noqa: E402

B, T, V = 4, 512, 32000


def main():
    import trl.trainer.utils as trl_utils
    import verl.utils.torch_functional as verl_F

    import bond_kernels.integrations.trl as bk_trl
    import bond_kernels.integrations.verl as bk_verl

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, V, generator=g) * 3
    y = torch.randint(0, V, (B, T), generator=g)
    up = torch.randn(B, T, generator=g)

    def fwd_bwd(f):
        def step():
            xx = x.detach().requires_grad_(True)
            f(xx).backward(up)
            return xx.grad

        return step

    def fwd(f):
        def step():
            with torch.no_grad():
                return f(x)

        return step

    cases = {
        "TRL selective_log_softmax, fwd+bwd": fwd_bwd(lambda xx: trl_utils.selective_log_softmax(xx, y)),
        "ours (trl drop-in), fwd+bwd": fwd_bwd(lambda xx: bk_trl.selective_log_softmax(xx, y)),
        "verl logprobs_from_logits, fwd+bwd": fwd_bwd(
            lambda xx: verl_F.logprobs_from_logits(xx.view(-1, V), y.view(-1)).view(B, T)
        ),
        "ours (verl drop-in), fwd+bwd": fwd_bwd(
            lambda xx: bk_verl.logprobs_from_logits(xx.view(-1, V), y.view(-1), inplace_backward=False).view(
                B, T
            )
        ),
        "TRL entropy_from_logits, fwd": fwd(lambda xx: trl_utils.entropy_from_logits(xx)),
        "ours (trl drop-in) entropy, fwd": fwd(lambda xx: bk_trl.entropy_from_logits(xx)),
        "verl entropy_from_logits, fwd": fwd(lambda xx: verl_F.entropy_from_logits(xx)),
        "ours (verl drop-in) entropy, fwd": fwd(lambda xx: bk_verl.entropy_from_logits(xx)),
    }
    ms = dict(zip(cases, round_robin_ms(list(cases.values()), rounds=3)))
    peak = {k: peak_extra_bytes(f) for k, f in cases.items()}
    print(
        f"\n{cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{C.today()}; (B, T, V) = ({B}, {T}, {V}) fp32 (logits {B * T * V * 4 / 2**20:.0f} MiB); medians of 3\n"
    )
    rows = [[k, round(t), f"{peak[k] / 2**20:.0f} MiB"] for k, t in ms.items()]
    print(C.markdown_table(["provider", "ms", "peak extra memory"], rows))


if __name__ == "__main__":
    main()
