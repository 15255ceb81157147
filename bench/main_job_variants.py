"""The README's main job with one optimizer's options changed: its final validation loss and
rank under another S-RSI start or truncation (docs/algorithm.md, Warm start), or AdaMeM's
momentum under a projection change (docs/adamem.md).

    python bench/main_job_variants.py OUT [--optimizer NAME] [key=value ...] [main-job options]

runs the main job for one optimizer alone, Adapprox unless ``--optimizer`` names another of the
main job's (its defaults otherwise: tiny GPT, 600 steps, k_max 3), with each ``key=value`` (a
Python literal) added to the optimizer's arguments, e.g. ``warm_start=True`` or
``truncation='rayleigh_ritz' power_iters=2``, or ``--optimizer adamem momentum_transfer='rotate'``,
and writes the main job's ``results.json`` and plot to OUT; the options it added are recorded in
that file's ``meta["<NAME>_options"]`` (``adapprox_options`` by default). Other arguments
(``--seed 1``, ``--steps 40 --warmup 4``: the warmup must be shorter than the run) go to the main
job.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapprox_kernels.train import optimizers
from adapprox_kernels.train.__main__ import main


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):  # no OUT: the usage; nothing runs
        print(
            "usage: python bench/main_job_variants.py OUT [--optimizer NAME] [key=value ...] [main-job options]\n\n"
            + __doc__.strip()
        )
        return 0 if argv else 2
    out, *rest = argv
    # Every main-job option takes a value, so a key=value right after one (--lr adamem=1e-3) is its value.
    options = [a for i, a in enumerate(rest) if "=" in a and not a.startswith("-") and not takes_value(rest[:i])]
    # allow_abbrev off: a main-job option such as --opt... must not be taken for --optimizer
    choose = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    choose.add_argument("--optimizer", choices=sorted(optimizers.OPTIMIZERS), default="adapprox")
    chosen, passed = choose.parse_known_args([a for a in rest if a not in options])
    name = chosen.optimizer
    extra = {k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in options)}
    build = optimizers.OPTIMIZERS[name]

    def variant(model, lr, device, k_max, seed):
        opt = build(model, lr, device, k_max, seed)
        for group in opt.param_groups:  # before the first step: as if given to the constructor
            group.update(extra)
        opt.defaults.update(extra)
        return opt

    optimizers.OPTIMIZERS[name] = variant
    status = main(["--optimizers", name, "--out", out, *passed])
    record_options(Path(out) / "results.json", name, extra)
    return status


def takes_value(before: list[str]) -> bool:
    """Does the last of ``before`` name an option whose value follows it (``--lr``, not ``--lr=…``,
    nor the value ``-1`` of ``--seed -1``)?"""
    return bool(before) and before[-1].startswith("-") and "=" not in before[-1] and not takes_value(before[:-1])


def record_options(path: Path, name: str, extra: dict) -> None:
    """Adds the variant's options to the meta of ``path`` (the main job's results.json, where the
    job got that far to write it): else the file's name is the only record of what it ran."""
    if path.is_file():
        data = json.loads(path.read_text())
        data["meta"][f"{name}_options"] = extra
        path.write_text(json.dumps(data, indent=1, allow_nan=False))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
