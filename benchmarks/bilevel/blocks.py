"""BSVRB's block sampling: iterations and block visits against the number of blocks per step.

Hu, Zhu & Yang 2023 claim a parallel speedup: sampling I of the m lower-level problems per
iteration (and B samples per block) cuts the iterations needed, at no more total work per
block visit. Here: m = 16 random quadratic lower levels (closed-form y_i*(x), x*), mini-batches
of 10 of 200 rows per block, the same step sizes for every I. Reported: iterations and block
visits (iterations x I) until F(x) - F(x*) first falls below 1e-3 of its start, and the wall
time. Writes the "blocks" section of RESULTS.md.

Usage: OMP_NUM_THREADS=1 ../../.venv/bin/python blocks.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from hesse.bilevel import BSVROptions, solve

torch.set_num_threads(1)
D = torch.float64
HERE = Path(__file__).parent


def problem(m=16, n=200, p=20, q=10, mu=0.5, rho=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(m, n, p, generator=g, dtype=D) / p**0.5
    B = torch.randn(m, p, q, generator=g, dtype=D) / q**0.5
    c, t = torch.randn(m, p, generator=g, dtype=D), torch.randn(m, p, generator=g, dtype=D)
    A = Z.transpose(1, 2) @ Z / n + mu * torch.eye(p, dtype=D)

    def upper(x, y, b):
        return 0.5 * ((y - t[b[0]]) ** 2).sum() + 0.5 * rho * (x @ x)

    def lower(x, y, b):
        i, rows = b
        Zr = Z[i] if rows is None else Z[i][rows]
        return 0.5 * ((Zr @ y) ** 2).sum() / len(Zr) + 0.5 * mu * (y @ y) - y @ (B[i] @ x + c[i])

    def data(i, gen):
        rows = None if gen is None else torch.randint(n, (10,), generator=gen)
        return (i,), (i, rows)

    def F(x):
        y = torch.linalg.solve(A, (B @ x + c)[..., None])[..., 0]
        return float(0.5 * ((y - t) ** 2).sum(1).mean() + 0.5 * rho * (x @ x))

    M = torch.linalg.solve(A, B)
    r = t - torch.linalg.solve(A, c[..., None])[..., 0]
    H = (M.transpose(1, 2) @ M).mean(0) + rho * torch.eye(q, dtype=D)
    x_star = torch.linalg.solve(H, (M.transpose(1, 2) @ r[..., None])[..., 0].mean(0))
    return upper, lower, data, F, x_star, (m, p, q, float(torch.linalg.eigvalsh(H)[-1]))


def main() -> None:
    upper, lower, data, F, x_star, (m, p, q, _) = problem()
    F_star = F(x_star)
    x0, Y0 = torch.zeros(q, dtype=D), torch.zeros(m, p, dtype=D)
    gap0 = F(x0) - F_star
    rows = [
        "| blocks per step I | inner_lr | iterations to gap 1e-3 | block visits | wall s | "
        "final gap / start |",
        "|---|---|---|---|---|---|",
    ]
    for n_blocks in (1, 4, 16):
        steps = 8000 // n_blocks
        xs: list = []
        # MSVR's correction is scaled by gamma ~ m / I (a block is seen every m / I steps), so
        # the lower-level steps must shrink like I / m to stay stable, and the upper step with
        # them (a single loop needs x slower than the y_i and u_i it reads)
        inner_lr, lr = 0.3 * n_blocks / m, 0.01 * n_blocks / m
        opts = BSVROptions(lr=lr, inner_lr=inner_lr, beta=0.5, beta_x=0.5, blocks_per_step=n_blocks)
        r = solve(
            upper,
            lower,
            x0,
            Y0,
            data=data,
            blocks=m,
            options=opts,
            steps=steps,
            seed=0,
            log_every=max(1, steps // 200),
            callback=lambda t, x, Y, xs=xs: xs.append((t, F(x))),
        )
        hit = next((t for t, f in xs if f - F_star <= 1e-3 * gap0), None)
        secs = dict(zip(r.trajectory.steps, r.trajectory.seconds, strict=True))
        rows.append(
            f"| {n_blocks} | {inner_lr:.3g} | {hit if hit is not None else f'> {steps}'} | "
            f"{hit * n_blocks if hit is not None else '-'} | "
            f"{secs[hit] if hit is not None else r.seconds:.1f} | "
            f"{(xs[-1][1] - F_star) / gap0:.1e} |"
        )
        print(rows[-1], flush=True)
    section = [
        "## blocks",
        "",
        (HERE / "blocks.py").read_text().split('"""')[1].strip(),
        "",
        f"m = {m} blocks, y_i in R^{p}, x in R^{q}; MSVR/STORM weights 0.5, lr 0.01 I / m, "
        "inner_lr 0.3 I / m, seed 0.",
        "",
        *rows,
        "",
    ]
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else ""
    text = text.split("## blocks")[0].rstrip() + "\n\n" + "\n".join(section)
    path.write_text(text)


if __name__ == "__main__":
    main()
