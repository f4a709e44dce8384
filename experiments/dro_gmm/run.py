"""RSS (DRO self-training) vs ERM on the paper's two-Gaussian mixture on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/dro_gmm/run.py --quick --out /tmp/gmm   # the acceptance cell
    OMP_NUM_THREADS=1 .venv/bin/python experiments/dro_gmm/run.py    # the whole table: results.{json,md}, plot.png here

Setting (spec section 5(f)): x = y * mu0 + N(0, I_d), y uniform in {-1, +1}, d = 200, ||mu0|| = 1; the
unlabelled pool is drawn from the same mixture ("same") or from the mixture with mean
mu1 = mu0 + 0.5 ||mu0|| v, v a random unit vector ("shifted"); test set 10,000 draws of the labelled
distribution. Bias-free linear classifier w, ramp loss l(t) = clip(1 - t, 0, 1) of the margin t = y w.x.

Surrogate (exact, not approximated by ascent: for a linear model the worst perturbation moves x along
-y w/||w||): phi_gamma(t) = max_{r >= 0} l(t - r ||w||) - gamma r^2, evaluated at its three candidate
maximisers (r = 0, the stationary point s/(2 gamma) clamped to the loss's linear region, its end).
ERM:  mean_i l(y_i w.x_i) + wd/2 ||w||^2.
RSS:  mean_i phi_gamma(y_i w.x_i) + lambda mean_j phi_gamma'(|w.x'_j|) + wd/2 ||w||^2, the pseudo-label
      sign(w.x'_j) detached (so y'_j w.x'_j = |w.x'_j|), started from the ERM warm-up of the same wd.
Optimiser: gradient descent (lr 0.1, 100 warm-up steps on the labelled term, then 300 steps; labelled
term full-batch, unlabelled term on 1,000 samples per step cycling through seeded permutations of the
pool), from w = 1e-3 N(0, I) (w = 0 sits on the ramp's kink). All hyper-parameter configurations of one (setting, seed) train at once as the rows of one
[C, d] tensor (the rows never interact, so this is C independent runs).

Hyper-parameters are picked per (setting, seed) by accuracy on a separate labelled VALIDATION draw of
1,000 samples (never on the test set -- the official notebook tunes on test); ERM: weight decay from a
16-point grid; RSS: 64 random (gamma, gamma', lambda, wd) with gamma' <= gamma, plus lambda = 0 points.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PAPER = {  # spec section 5(f): m -> (ERM, [same-dist RSS per n], [shifted RSS per n])
    10: (0.59, [0.63, 0.66, 0.79, 0.82], [0.61, 0.65, 0.78, 0.81]),
    20: (0.62, [0.64, 0.69, 0.80, 0.82], [0.65, 0.65, 0.79, 0.80]),
    40: (0.65, [0.65, 0.71, 0.81, 0.82], [0.65, 0.73, 0.78, 0.80]),
}


def ramp(t: torch.Tensor) -> torch.Tensor:
    return (1 - t).clamp(0, 1)


def dro_ramp(t: torch.Tensor, s: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """sup_{r >= 0} ramp(t - r s) - gamma r^2, exactly. t: margins [C, N]; s = ||w|| [C, 1]; gamma [C, 1]."""
    s = s.clamp_min(1e-12)
    lo = ((t - 1) / s).clamp_min(0)  # where the loss starts rising
    hi = (t / s).clamp_min(0)  # where it reaches 1
    r_star = torch.minimum(torch.maximum((s / (2 * gamma)).expand_as(t), lo), hi)
    candidates = torch.stack([r.expand_as(t) for r in (torch.zeros_like(t), r_star, hi)])
    values = ramp(t - candidates * s) - gamma * candidates**2
    return values.max(0).values


def sample(n: int, mu: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return y[:, None] * mu + torch.randn(n, mu.numel(), generator=g), y


def accuracy(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row of w [C, d]; a zero w predicts 0 and counts as wrong."""
    return (torch.sign(w @ x.T) == y).float().mean(1)


def train(x, y, xu, hp, warmup=100, steps=300, lr=0.1, u_batch=1000, seed=0):
    """Rows of ``hp`` (dict of [C] tensors: gamma, gamma_u, lam, wd) trained at once; returns w [C, d].

    The unlabelled term uses ``u_batch`` samples per step, taken in order from seeded permutations of the
    whole pool (cycled: every unlabelled sample is used once per pass)."""
    c = hp["wd"].numel()
    g = torch.Generator().manual_seed(seed)
    w = (1e-3 * torch.randn(c, x.shape[1], generator=g)).requires_grad_(True)  # w = 0 is a ramp-loss kink
    opt = torch.optim.SGD([w], lr=lr)
    order = torch.empty(0, dtype=torch.long)
    for step in range(warmup + steps):
        s = w.norm(dim=1, keepdim=True)
        margins = y * (w @ x.T)
        if step < warmup or hp.get("erm", False):
            loss = ramp(margins).mean(1)
        else:
            loss = dro_ramp(margins, s, hp["gamma"][:, None]).mean(1)
            if xu is not None:
                if len(order) < min(u_batch, len(xu)):
                    order = torch.cat([order, torch.randperm(len(xu), generator=g)])
                idx, order = order[:u_batch], order[u_batch:]
                scores = w @ xu[idx].T
                pseudo = torch.sign(scores).detach()  # detached pseudo-labels
                loss = loss + hp["lam"] * dro_ramp(pseudo * scores, s, hp["gamma_u"][:, None]).mean(1)
        loss = loss + 0.5 * hp["wd"] * (w**2).sum(1)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    return w.detach()


def log_uniform(lo, hi, k, g):
    return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(k, generator=g))


_ERM_CACHE: dict[tuple[int, int], float] = {}


def erm_accuracy(m, seed, x, y, xv, yv, xt, yt):
    """ERM depends only on the labelled / validation / test draws of (m, seed), which every n and both
    pools of that seed share: train it once per (m, seed), not once per setting."""
    if (m, seed) not in _ERM_CACHE:
        wd_grid = torch.logspace(-4, 0, 16)
        w_erm = train(x, y, None, {"wd": wd_grid, "erm": True}, seed=seed)
        val = accuracy(w_erm, xv, yv)
        _ERM_CACHE[(m, seed)] = accuracy(w_erm[val.argmax()][None], xt, yt).item()
    return _ERM_CACHE[(m, seed)]


def run_setting(m, n, shift, seed, d=200, n_val=1000, n_test=10000, configs=64):
    g = torch.Generator().manual_seed(1000 * seed + 7)
    mu0 = torch.randn(d, generator=g)
    mu0 /= mu0.norm()
    v = torch.randn(d, generator=g)
    v /= v.norm()
    mu1 = mu0 + 0.5 * v if shift else mu0
    # same labelled / val / test draws for every n and for both pools of a seed (generator order fixed)
    x, y = sample(m, mu0, g)
    xv, yv = sample(n_val, mu0, g)
    xt, yt = sample(n_test, mu0, g)
    gu = torch.Generator().manual_seed(1000 * seed + 11 + int(shift))
    xu, _ = sample(n, mu1, gu)

    erm = erm_accuracy(m, seed, x, y, xv, yv, xt, yt)

    hg = torch.Generator().manual_seed(seed)
    gamma = log_uniform(0.05, 20, configs, hg)
    gamma_u = gamma * log_uniform(1e-3, 1, configs, hg)  # gamma' <= gamma, as the official search
    lam = log_uniform(0.1, 20, configs, hg)
    lam[: configs // 8] = 0.0  # a few labelled-only DRO points
    wd = log_uniform(1e-4, 1, configs, hg)
    w = train(x, y, xu, {"gamma": gamma, "gamma_u": gamma_u, "lam": lam, "wd": wd}, seed=seed)
    val = accuracy(w, xv, yv)
    best = int(val.argmax())
    rss = accuracy(w[best][None], xt, yt).item()
    chosen = {"gamma": gamma[best].item(), "gamma_u": gamma_u[best].item(), "lam": lam[best].item(), "wd": wd[best].item()}
    mean_est = accuracy((y[:, None] * x).mean(0)[None], xt, yt).item()  # reference: the class-mean direction
    return erm, rss, chosen, mean_est


def plot(results, path):
    """Accuracy vs n per m: measured RSS (solid: same pool, dashed: shifted), measured ERM (grey), and the
    paper's numbers (circles: same, squares: shifted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = sorted(int(m) for m in results)
    fig, axes = plt.subplots(1, len(ms), figsize=(4.2 * len(ms), 3.8), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], ms, strict=True):
        r = results[str(m)]
        ns = sorted(int(n) for n in r["same"])
        paper_ns = [m, 10 * m, 100 * m, 10000]
        color = {10: "tab:blue", 20: "tab:orange", 40: "tab:green"}.get(m, "tab:purple")
        ax.axhline(r["erm_mean"], color="0.5", linewidth=1.5, label="ERM (measured)")
        for key, style, marker in (("same", "-", "o"), ("shifted", "--", "s")):
            ax.plot(ns, [r[key][str(n)]["rss_mean"] for n in ns], style, color=color, label=f"RSS {key} (measured)")
            paper = PAPER[m][1 if key == "same" else 2]
            ax.plot(paper_ns, paper, marker, color="black", fillstyle="none", linestyle="none", label=f"paper, {key}")
        ax.set_xscale("log")
        ax.set_title(f"m = {m} labelled")
        ax.set_xlabel("n unlabelled")
        ax.grid(True, color="0.9")
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--quick", action="store_true",
                        help="only the acceptance cell: m = 10, n in {1000, 10000}, both pools (seconds, not minutes)")
    parser.add_argument("--plot-only", action="store_true", help="redraw plot.png from the results.json in --out")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((args.out / "results.json").read_text())["results"], args.out / "plot.png")
        return
    ms = (10,) if args.quick else (10, 20, 40)
    torch.set_num_threads(1)
    start = time.time()
    results: dict = {}
    for m in ms:
        results[str(m)] = {"same": {}, "shifted": {}}
        erms, means = [], []
        for key in ("same", "shifted"):
            for n in ((100 * m, 10000) if args.quick else (m, 10 * m, 100 * m, 10000)):
                rows = [run_setting(m, n, key == "shifted", seed) for seed in range(args.seeds)]
                erms += [r[0] for r in rows]
                means += [r[3] for r in rows]
                rss = [r[1] for r in rows]
                results[str(m)][key][str(n)] = {
                    "rss": rss, "rss_mean": sum(rss) / len(rss), "erm": [r[0] for r in rows],
                    "chosen": [r[2] for r in rows], "mean_estimator": [r[3] for r in rows],
                }
                print(f"m={m:3d} n={n:6d} {key:8s} ERM {sum(r[0] for r in rows) / len(rows):.3f} "
                      f"RSS {sum(rss) / len(rss):.3f}  ({time.time() - start:.0f}s)", flush=True)
        results[str(m)]["erm_mean"] = sum(erms) / len(erms)
        results[str(m)]["mean_estimator_mean"] = sum(means) / len(means)
    wall = time.time() - start
    meta = {"seeds": args.seeds, "quick": args.quick, "wall_s": round(wall, 1), "torch": torch.__version__,
            "machine": f"{platform.processor() or platform.machine()}, 1 thread"}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = ["| m | ERM (paper) | class-mean w | n | RSS same (paper) | RSS shifted (paper) | RSS − ERM same / shifted |",
             "|---|---|---|---|---|---|---|"]
    for m in ms:
        r = results[str(m)]
        for n in sorted(int(k) for k in r["same"]):
            i = [m, 10 * m, 100 * m, 10000].index(n)
            s, h = r["same"][str(n)], r["shifted"][str(n)]
            erm_s = sum(s["erm"]) / len(s["erm"])
            erm_h = sum(h["erm"]) / len(h["erm"])
            lines.append(
                f"| {m} | {erm_s:.3f} ({PAPER[m][0]:.2f}) | {r['mean_estimator_mean']:.3f} | {n} | {s['rss_mean']:.3f} ({PAPER[m][1][i]:.2f}) | "
                f"{h['rss_mean']:.3f} ({PAPER[m][2][i]:.2f}) | {s['rss_mean'] - erm_s:+.3f} / {h['rss_mean'] - erm_h:+.3f} |"
            )
    (args.out / "results.md").write_text("\n".join(lines) + f"\n\n{meta}\n")
    plot(results, args.out / "plot.png")
    print("\n".join(lines))
    print(meta)


if __name__ == "__main__":
    main()
