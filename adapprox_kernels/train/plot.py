"""The main job's figure: validation loss of every optimizer, and Adapprox's rank over time."""

from __future__ import annotations

from pathlib import Path


def plot_runs(runs: list[dict], path: Path) -> None:
    """Failed runs (those with an ``error``) have no curves and are left out. Losses may be None
    (results.json's NaN): matplotlib leaves a gap there."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    runs = [r for r in runs if "error" not in r]
    fig, (ax_loss, ax_rank) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        ax_loss.plot(r["eval_steps"], r["val_loss"], marker="o", ms=3, label=f"{r['name']} (lr {r['lr']:g})")
    ax_loss.set(xlabel="step", ylabel="validation loss (nats/byte)", title="Validation loss")
    ax_loss.grid(alpha=0.3)
    if runs:
        ax_loss.legend()
    ranked = [r for r in runs if r["ranks"]]
    for r in ranked:
        for kind in sorted(r["ranks"][-1]):
            ax_rank.plot(r["rank_steps"], [x.get(kind, float("nan")) for x in r["ranks"]], label=f"{r['name']}: {kind}")
    ax_rank.set(xlabel="step", ylabel="mean rank k", title="Adapted rank per matrix type")
    ax_rank.grid(alpha=0.3)
    if ranked:
        ax_rank.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
