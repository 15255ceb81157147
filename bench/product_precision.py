"""Does tf32 in the S-RSI products change what Adapprox decides? A shadow-optimizer study.

One model (the main job's byte-level GPT) trains with Adapprox at the default product precision
(``tf32x3``, about fp32). At every step a second Adapprox, identical but for
``product_precision``, steps its own copy of the parameters with the *same* gradients: no
feedback, so the two differ by the precision alone. Recorded per step: ξ and the rank of every
factored matrix under both, and the parameter gap ``‖W_other − W_ref‖ / ‖W_ref − W_0‖``. GPU
only (the interpreter computes every dot in fp32).

``python bench/product_precision.py [--size gpt2-124m] [--steps 120] [--k-max 8] [--warm]
[--precision tf32]`` writes ``bench/results/product_precision_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adapprox_kernels import Adapprox  # noqa: E402
from adapprox_kernels.train.data import ByteBatches, read_corpus  # noqa: E402
from adapprox_kernels.train.model import GPT, SIZES  # noqa: E402
from adapprox_kernels.train.runner import environment, warmup_cosine  # noqa: E402


def factored(opt: Adapprox, model: torch.nn.Module) -> list[tuple[str, dict]]:
    return [(n, opt.state[p]) for n, p in model.named_parameters() if "Q" in opt.state.get(p, {})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="gpt2-124m", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--warm", action="store_true", help="warm-start S-RSI (l = 1) in both")
    ap.add_argument("--precision", default="tf32", choices=["tf32", "ieee"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("product_precision.py needs a GPU: on CPU every product is fp32")
    device = "cuda"
    cfg = SIZES[args.size]
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    shadow = [p.detach().clone() for p in model.parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    common = dict(lr=2e-3, k_init=args.k_max, k_max=args.k_max, seed=0, warm_start=args.warm, backend="triton")
    ref = Adapprox(model.parameters(), **common)
    other = Adapprox([torch.nn.Parameter(s) for s in shadow], product_precision=args.precision, **common)
    other_params = other.param_groups[0]["params"]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(20, args.steps)) for o in (ref, other)]
    data = ByteBatches(read_corpus(None, 8_000_000), cfg.seq_len, args.batch_size, seed=0)
    rows = []
    for step in range(1, args.steps + 1):
        loss = model.loss(data.train_batch().to(device))
        ref.zero_grad(set_to_none=True)
        loss.backward()
        for p, s in zip(model.parameters(), other_params):
            s.grad = p.grad
        ref.step()
        other.step()
        for sched in scheds:
            sched.step()
        names_ref = factored(ref, model)
        states_other = [other.state[s] for s in other_params if "Q" in other.state.get(s, {})]
        with torch.no_grad():
            gap = sum((s - p).square().sum() for p, s in zip(model.parameters(), other_params)).sqrt()
            moved = sum((p - w0).square().sum() for p, w0 in zip(model.parameters(), start)).sqrt()
        xi_ref = [st["xi"] for _, st in names_ref]
        xi_other = [st["xi"] for st in states_other]
        rows.append(dict(
            step=step, loss=loss.item(), param_gap=(gap / moved).item(),
            xi_ref=xi_ref, xi_other=xi_other,
            rank_ref=[st["rank"] for _, st in names_ref], rank_other=[st["rank"] for st in states_other],
        ))  # fmt: skip
        if step % 20 == 0 or step == 1:
            r = rows[-1]
            print(f"step {step:4d}  loss {r['loss']:.3f}  mean ξ {statistics.mean(xi_ref):.3e} / "
                  f"{statistics.mean(xi_other):.3e}  mean rank {statistics.mean(r['rank_ref']):.2f} / "
                  f"{statistics.mean(r['rank_other']):.2f}  param gap {r['param_gap']:.2e}", flush=True)  # fmt: skip
    names = [n for n, _ in factored(ref, model)]
    differ = sum(round(a) != round(b) for r in rows for a, b in zip(r["rank_ref"], r["rank_other"]))
    summary = dict(
        rank_decisions_that_differ=differ, rank_decisions=len(rows) * len(names),
        mean_xi_ref=statistics.mean(x for r in rows for x in r["xi_ref"]),
        mean_xi_other=statistics.mean(x for r in rows for x in r["xi_other"]),
        final_param_gap=rows[-1]["param_gap"],
    )  # fmt: skip
    print(json.dumps(summary, indent=1))
    meta = dict(environment(device), args=vars(args), matrices=names)
    out = Path(args.out) / f"product_precision_{torch.cuda.get_device_name().lower().replace(' ', '-')}.json"
    out.write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
