"""Which loss terms switch the foreground on or off: their pull on the z_pres logits over the first steps.

    python bench/z_pres_forces.py --data results/data/room3d_small.zarr --preset demo --steps 300 \\
        --out bench/results/z_pres_forces_demo.json
    python bench/z_pres_forces.py --from bench/results/z_pres_forces_demo.json --markdown

Trains a fresh model with the trainer's own `train_step` (the preset and any `--set`, one thread by
default) and, every --every steps before the step, takes the gradient of each term of the loss with respect
to the z_pres logits of the batch's cells: minus the log-likelihood (equation 1), z_pres's KL, the z_where,
z_depth and z_what KLs (as the loss weights them: by the z_pres sample under model.kl_weighting=z_pres,
z_what's by model.kl_what_weight) and the boundary loss. Each is reported as the mean over cells, per image,
times 1,000: positive pushes the cells off (gradient descent lowers the logits), negative pushes them on.
Also the mean z_pres probability, the share of cells above 0.5, and the foreground's share of the canvas
(alpha, from the relaxed z_pres samples that training sees). A foreground that dies early shows here as
the off-pushing terms outweighing the likelihood's pull while z_pres falls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import emit, machine  # noqa: E402

TERMS = ("-log_lik", "kl_pres", "kl_where", "kl_depth", "kl_what", "boundary")


def forces(net, x, step: int, cfg) -> dict:
    """One batch's pull of each loss term on the z_pres logits (see the module's docstring)."""
    import torch

    kept = {}
    hook = net.fg.z_pres_net.register_forward_hook(lambda m, i, o: kept.__setitem__("logit", o))
    try:
        out = net(x, step)
    finally:
        hook.remove()
    fg, t = out["fg"], out["terms"]
    parts = {  # per image means, as in the loss
        "-log_lik": -t["log_lik"], "kl_pres": t["kl_pres"], "kl_where": t["kl_where"], "kl_depth": t["kl_depth"],
        "kl_what": cfg.model.kl_what_weight.at(step) * t["kl_what"],
        "boundary": t["boundary_loss"],  # weighted, as in the loss
    }
    b = x.shape[0]
    row = {"step": step}
    for name, value in parts.items():
        # The terms are batch means, so B x d(term)/d(logit) is each cell's pull on its own image's term.
        # A term that does not depend on z_pres (the KLs under model.kl_weighting=every_cell) pulls with 0.
        g = torch.autograd.grad(value, kept["logit"], retain_graph=True, allow_unused=True)[0]  # (B, 1, G, G)
        row[name] = 0.0 if g is None else round(float(g.mean()) * b * 1000, 2)
    p = fg["z_pres_prob"].detach()
    row.update(p_mean=round(float(p.mean()), 4), p_on=round(float((p > 0.5).float().mean()), 4),
               alpha=round(float(fg["alpha"].detach().mean()), 4),
               values={k: round(float(v), 1) for k, v in parts.items()})
    return row


def run(ns) -> dict:
    import torch

    from space.config import resolve_config
    from space.data import StepBatchSampler, StoreDataset
    from space.model import SPACE
    from space.train import optimisers, train_step

    cfg = resolve_config(ns.preset, None, ns.set)
    torch.set_num_threads(ns.threads)
    torch.manual_seed(cfg.train.seed)
    data = StoreDataset(ns.data, "train", cfg.model.image_size)
    sampler = StepBatchSampler(len(data), cfg.train.batch_size, cfg.train.seed)
    net = SPACE(cfg.model)
    opt_fg, opt_bg = optimisers(net, cfg.train)
    rows = []
    for step in range(ns.steps + 1):
        x = data.__getitems__(sampler.batch(step))
        if step % ns.every == 0:
            net.train()
            rows.append(forces(net, x, step, cfg))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if step < ns.steps:
            train_step(net, x, step, opt_fg, opt_bg, cfg.train)
    return {"preset": ns.preset, "set": ns.set, "data": ns.data, "threads": ns.threads, "rows": rows,
            "machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def table(results: dict) -> str:
    head = "| step | z_pres mean | cells > 0.5 | alpha | " + " | ".join(TERMS) + " |"
    lines = [head, "|" + "---|" * (4 + len(TERMS))]
    for r in results["rows"]:
        lines.append(f"| {r['step']} | {r['p_mean']:.3f} | {r['p_on']:.2f} | {r['alpha']:.3f} | "
                     + " | ".join(f"{r[k]:+.0f}" for k in TERMS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="scene store to train on (its train split)")
    p.add_argument("--preset", default="demo", help="settings preset (default: demo)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.NAME=VALUE",
                   help="override a setting, as `python -m space train --set` (repeatable)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    p.add_argument("--every", type=int, default=20, help="measure every this many steps (default: 20)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--out", help="write the results here (JSON)")
    p.add_argument("--from", dest="source", help="print the table of an earlier results file instead")
    p.add_argument("--markdown", action="store_true", help="print the table alone (bench/tables.py)")
    ns = p.parse_args(argv)
    if ns.source:
        if not Path(ns.source).exists():
            p.error(f"--from {ns.source}: no such results file")
        results = json.loads(Path(ns.source).read_text())
    else:
        if not ns.data:
            p.error("--data is needed to train (or give --from RESULTS.json)")
        if ns.every < 1 or ns.steps < 0:
            p.error("--every must be 1 or more and --steps 0 or more")
        results = run(ns)
    emit(results, table(results), None if ns.source else ns.out, ns.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
