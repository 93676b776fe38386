"""The demo's output: the printed table, the PNG (matplotlib, imported when the plot is drawn), the
versions and the NaN-free JSON of the metrics."""

import math
import platform

import torch

import bond_kernels as bk

from .evaluate import BON_SIZES, bon_curve


def format_table(metrics):
    rows = [("policy", "mean reward", "mean quantile", "KL(·‖π_ref) nats")]
    ref = metrics["reference"]
    rows.append(("π_ref (reference)", f"{ref['reward']:.3f}", f"{ref['quantile']:.3f}", "0 (exact)"))
    for n in BON_SIZES:
        row = metrics["best_of_n"][str(n)]
        rows.append(
            (
                f"Best-of-{n} of π_ref",
                f"{row['reward']:.3f}",
                f"{row['quantile']:.3f}",
                f"{row['kl_closed_form']:.3f} (log N-(N-1)/N; a bound if rewards tie)",
            )
        )
    pol = metrics["policy"]
    rows.append(
        (
            f"J-BOND policy ({metrics['config']['steps']} steps)",
            f"{pol['reward']:.3f}",
            f"{pol['quantile']:.3f}",
            f"{pol['kl_to_ref']:.3f} ± {pol['kl_to_ref_stderr']:.3f} (sampled)",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = metrics["training"]
    lines.append("")
    lines.append(
        f"training: {t['tokens_per_s']:.0f} tokens/s ({t['tokens']} response tokens sampled in {t['seconds']:.1f} s; "
        f"{t['steps_per_s']:.2f} steps/s)"
    )
    be = metrics["backend"]
    lines.append(
        f"backend: {be['op']} -> {be['ran']!r} on {metrics['device']} (log-prob path: {be['logprob_path']}; "
        f"token_logprobs resolves to {be['token_logprobs']!r})"
    )
    lines.append(
        f"reference: next-token entropy {metrics['reference_model']['next_token_entropy']:.3f} nats "
        f"(uniform {math.log(metrics['config']['vocab']):.3f}, the language's own {metrics['reference_model']['language_entropy_rate']:.3f}); "
        f"target token {metrics['reference_model']['target_token']} at {metrics['reference_model']['target_freq']:.3f}"
    )
    return "\n".join(lines)


def format_written(png, json_path, seconds):
    """The run's last line: where the plot and the metrics went, and the whole run's wall time."""
    return f"wrote {png} and {json_path} ({seconds:.1f} s in all)"


def write_plot(path, metrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    curve = bon_curve()
    ax.plot(
        [c[0] for c in curve],
        [c[1] for c in curve],
        "-",
        color="0.5",
        lw=1.5,
        label="Best-of-N, continuous rewards, N = 1..64",
    )
    for n in (2, 4, 8, 16, 32, 64):
        x, y = curve[n - 1]
        ax.annotate(f"N={n}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8, color="0.4")
    bx = [metrics["best_of_n"][str(n)]["kl_closed_form"] for n in BON_SIZES]
    by = [metrics["best_of_n"][str(n)]["quantile"] for n in BON_SIZES]
    ax.plot(bx, by, "s", color="tab:green", ms=7, label="Best-of-2/4/8 of π_ref (measured quantile)")
    traj = metrics["trajectory"]
    tx = [p["kl_to_ref"] for p in traj]
    ty = [p["quantile"] for p in traj]
    ax.plot(tx, ty, "-", color="tab:blue", lw=1, alpha=0.6)
    sc = ax.scatter(
        tx, ty, c=[p["step"] for p in traj], cmap="viridis", s=28, zorder=3, label="J-BOND policy"
    )
    fig.colorbar(sc, ax=ax, label="step")
    ax.axhline(0.5, color="0.8", lw=0.8, ls=":")
    ax.set_xlabel("KL(π ‖ π_ref)  [nats, sampled]")
    ax.set_ylabel("mean reward quantile under π_ref")
    ax.set_title("J-BOND against Best-of-N")
    ax.set_xlim(left=min(-0.05, min(tx) - 0.05))
    ax.legend(loc="lower right", fontsize=8)

    ax2.plot(
        [p["step"] for p in traj], [p["reward"] for p in traj], "o-", color="tab:blue", label="J-BOND policy"
    )
    ax2.axhline(metrics["reference"]["reward"], color="0.3", ls="--", lw=1, label="π_ref")
    for n, colour in zip(BON_SIZES, ("tab:olive", "tab:green", "tab:cyan")):
        ax2.axhline(
            metrics["best_of_n"][str(n)]["reward"], color=colour, ls=":", lw=1.2, label=f"Best-of-{n}"
        )
    ax2.set_xlabel("step")
    ax2.set_ylabel("mean reward")
    ax2.set_title("reward along training (held-out prompts)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _versions():
    out = {"bond_kernels": bk.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except Exception as exc:
        out["transformers"] = f"unavailable ({type(exc).__name__})"
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:
        out["triton"] = f"unavailable ({type(exc).__name__})"
    return out


def _json_safe(x):
    """NaN and ±inf become null (JSON has no such numbers; e.g. the spread of a single sample)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x
