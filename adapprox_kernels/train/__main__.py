"""``python -m adapprox_kernels.train``: train a small GPT with Adapprox and its peers.

Prints a table (validation loss, optimizer-state bytes and their ratio to AdamW, iteration and
optimizer-step time, final mean rank), and writes ``results.json`` and ``comparison.png`` to
``--out``. A run that raises is recorded as failed and the job goes on (exit status 1).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import math
import os
import stat
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from ..options import INT_OPTION_MAX
from .data import ByteBatches, read_corpus
from .model import SIZES
from .optimizers import OPTIMIZERS, default_lrs, missing_peers
from .plot import plot_runs
from .runner import RunConfig, environment, train_one

RESULTS, PLOT = "results.json", "comparison.png"  # what the job writes into --out
# The outputs opened where they are, with their writers' flags (Path.write_text's "w", Pillow's
# "w+b") less O_CREAT and O_TRUNC; results.json is replaced by a rename, which needs only the
# folder, unless the file is immutable or append-only (chattr +i, +a): see unwritable_output.
IN_PLACE = {RESULTS + ".partial": os.O_WRONLY, PLOT: os.O_RDWR}


def int_at_least(low: int):
    """An argparse type: an integer ``>= low``, and at most the optimizers' bound on their int
    options (a larger --k-max failed only when Adapprox's run started; --threads overflowed)."""

    def parse(text: str) -> int:
        if not text.strip().lstrip("+-").isdigit() or not low <= int(text) <= INT_OPTION_MAX:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low:,}, {INT_OPTION_MAX:,}], got {text!r}")
        return int(text)

    return parse


def optimizer_names(text: str) -> list[str]:
    """An argparse type: a comma list of the main job's optimizers."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        what = f"unknown {', '.join(unknown)}" if unknown else "none given"
        raise argparse.ArgumentTypeError(f"{what}; choose from {', '.join(OPTIMIZERS)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # a second run would only overwrite the first one's row
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} given more than once")
    return names


def lr_overrides(text: str) -> dict[str, float]:
    """An argparse type: ``name=value,...`` learning rates, each positive and finite, one per name."""
    lrs = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        name, eq, value = (part.strip() for part in item.partition("="))
        if not eq:
            raise argparse.ArgumentTypeError(f"{item!r}: expected name=value, e.g. adamw=1e-3")
        if name not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(f"{item!r}: unknown optimizer; choose from {', '.join(OPTIMIZERS)}")
        if name in lrs:
            raise argparse.ArgumentTypeError(f"{item!r}: a second learning rate for {name}")
        try:
            lrs[name] = float(value)
        except ValueError:
            lrs[name] = math.nan  # rejected just below, with the same message
        if not 0 < lrs[name] < math.inf:
            raise argparse.ArgumentTypeError(f"{item!r}: the learning rate must be a positive number")
    return lrs


def given_path(text: str) -> str:
    """An argparse type: a path that is not empty (``Path("")`` is the current folder, and an
    empty ``--data "$DIR"`` or ``--out "$DIR"`` is a slip, not a request for it)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; leave the option out for its default")
    return text


class MergeRates(argparse.Action):
    """``--lr`` given more than once: the rates of every flag, not only the last one's."""

    def __call__(self, parser, namespace, values, option_string=None):
        rates = getattr(namespace, self.dest)
        twice = sorted(rates.keys() & values.keys())
        if twice:
            raise argparse.ArgumentError(self, f"a second learning rate for {', '.join(twice)}")
        setattr(namespace, self.dest, rates | values)  # a new dict: the default one stays empty


def seed_value(text: str) -> int:
    """An argparse type: an integer that torch's generators take, in ``[-2**63, 2**64)``."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [-2**63, 2**64), got {text!r}")
    return value


def device_name(text: str) -> str:
    """An argparse type: ``cpu``, or ``cuda`` / ``cuda:N`` where torch sees that GPU."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: torch sees {torch.cuda.device_count()} CUDA device(s) here")
    return text


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m adapprox_kernels.train", description=__doc__)
    positive = int_at_least(1)
    ap.add_argument("--data", type=given_path, default=None,
                    help="text file, or folder searched recursively for .py/.txt/.md/.rst files "
                         "(default: the Python standard library's .py sources)")  # fmt: skip
    ap.add_argument("--max-bytes", type=int_at_least(10_000), default=8_000_000,
                    help="corpus size cap, >= 10,000 (default %(default)s)")  # fmt: skip
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny",
                    help="model size (default %(default)s; gpt2-124m: for a GPU)")  # fmt: skip
    ap.add_argument("--steps", type=positive, default=600, help="training steps per optimizer (default %(default)s)")
    ap.add_argument("--warmup", type=int_at_least(0), default=50,
                    help="steps of linear warmup before the cosine decay, fewer than --steps "
                         "(default %(default)s)")  # fmt: skip
    ap.add_argument("--batch-size", type=positive, default=16, help="sequences per step (default %(default)s)")
    ap.add_argument("--seq-len", type=positive, default=None, help="default (and most): the model size's context")
    ap.add_argument("--eval-every", type=positive, default=50, help="steps between evaluations (default %(default)s)")
    ap.add_argument("--eval-batches", type=positive, default=8,
                    help="validation batches per evaluation (default %(default)s)")  # fmt: skip
    ap.add_argument("--optimizers", type=optimizer_names, default=",".join(OPTIMIZERS),
                    help=f"comma list of {', '.join(OPTIMIZERS)}")  # fmt: skip
    ap.add_argument("--lr", type=lr_overrides, action=MergeRates, default={},
                    help="overrides for the chosen --optimizers, e.g. 'adamw=1e-3,adapprox=3e-3' (defaults: "
                         + ", ".join(f"{name}={lr:g}" for name, lr in default_lrs().items()) + ")")  # fmt: skip
    ap.add_argument("--k-max", type=positive, default=3,
                    help="Adapprox k_init = k_max (default %(default)s; the paper's 256 needs ~10k+ steps to pay "
                         "off)")  # fmt: skip
    ap.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda or cuda:N (default here: %(default)s)")  # fmt: skip
    ap.add_argument("--threads", type=positive, default=None,
                    help="CPU threads for torch (default: torch's, one per core; where other work keeps the "
                         "cores busy, 1 runs many times faster)")  # fmt: skip
    ap.add_argument("--seed", type=seed_value, default=0,
                    help="data order, model init and the optimizers' sketch RNGs (default %(default)s)")  # fmt: skip
    ap.add_argument("--out", type=given_path, default="runs/main",
                    help="folder for results.json and comparison.png (default %(default)s, under the "
                         "current folder)")  # fmt: skip
    return ap


def missing_main_extra() -> list[str]:
    """The packages of setup.py's ``main`` extra that the job itself needs (progress bars, the
    plot) and that do not import; checked before any run, not after all of them have trained."""
    missing = []
    for module in ("tqdm", "matplotlib"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def load_corpus(ap: argparse.ArgumentParser, args: argparse.Namespace, seq_len: int) -> bytes:
    """The corpus, checked before any run starts: it exists, is big enough, and both of its
    splits hold a window of ``seq_len``; otherwise a usage error."""
    try:
        corpus = read_corpus(args.data, args.max_bytes)
        ByteBatches(corpus, seq_len, args.batch_size)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    return corpus


def out_dir(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """``--out``, created and checked before any run starts, not after all of them have trained:
    a writable folder where the outputs' names are free or files it can write; otherwise a usage error."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        ap.error(f"--out {args.out} is a file, not a folder")
    for name in (RESULTS, RESULTS + ".partial", PLOT):  # .partial: see write_results
        if (out / name).exists() and not (out / name).is_file():
            ap.error(f"--out {args.out}: {name} there is not a file; remove it or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # an existing folder may still refuse files; leaves none
    except OSError as e:
        ap.error(f"--out {args.out}: {e.strerror or e}")  # not e.filename: the probe's random name
    unwritable = unwritable_output(out)
    if unwritable:
        ap.error(f"--out {args.out}: {unwritable}; remove it or choose another --out")
    return out


def unwritable_output(out: Path) -> str | None:
    """The first output in ``out`` that exists, is opened in place and cannot be (read-only,
    immutable), with the reason; None if none. Opened without truncating: it stays as it was.
    results.json is probed too: a rename over it fails where it is immutable or append-only
    (after the first run), which opening it for writing tells apart from a read-only file,
    replaced without a word, by the error: EPERM, where a mode bit gives EACCES. A link is not
    followed (ELOOP): the rename replaces the link, whatever it points to (Windows has no flag)."""
    for name, flags in (*IN_PLACE.items(), (RESULTS, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))):
        try:
            os.close(os.open(out / name, flags))
        except FileNotFoundError:
            continue  # created later, in a folder that takes files
        except OSError as e:
            if name != RESULTS or e.errno == errno.EPERM:
                return f"{name} there cannot be written ({e.strerror})"
    if sticky_keeps(out, RESULTS):
        return f"{RESULTS} there belongs to another user and the folder is sticky (as /tmp): it cannot be replaced"
    return None


def sticky_keeps(out: Path, name: str) -> bool:
    """Whether ``out`` has the sticky bit (/tmp's mode 1777) and so keeps this user from renaming
    over ``name``: only the file's owner, the folder's or a privileged user may (opening the
    file for writing says nothing of it). Root is taken as privileged."""
    try:
        folder, entry = out.stat(), (out / name).lstat()
    except FileNotFoundError:
        return False
    uid = os.geteuid() if hasattr(os, "geteuid") else 0  # Windows: no sticky folders
    return bool(folder.st_mode & stat.S_ISVTX) and uid not in (0, folder.st_uid, entry.st_uid)


def finite_or_none(value):
    """``value`` with NaN and ±inf floats (in lists and dicts too) as None: strict JSON has no
    token for them, and a diverged run's losses are NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_results(path: Path, meta: dict, runs: list[dict]) -> None:
    """Strict JSON, replaced whole: a job killed while writing keeps the previous file."""
    text = json.dumps(finite_or_none({"meta": meta, "runs": runs}), indent=1, allow_nan=False)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def print_table(runs: list[dict]) -> None:
    adamw = next((r["state_bytes"] for r in runs if r["name"] == "adamw" and "error" not in r), None)
    head = (f"{'optimizer':12s} {'lr':>8s} {'val loss':>9s} {'best val':>9s} {'state bytes':>12s} {'vs AdamW':>9s} "
            f"{'iteration ms':>12s} {'step ms':>8s} {'mean rank':>9s}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in runs:
        if "error" in r:
            print(f"{r['name']:12s} {r['lr']:>8.2g} failed: {r['error']}")
            continue
        ratio = f"{100 * r['state_bytes'] / adamw:.1f}%" if adamw else "-"
        rank = f"{r['final_mean_rank']:.2f}" if r.get("final_mean_rank") is not None else "-"
        print(
            f"{r['name']:12s} {r['lr']:>8.2g} {r['final_val_loss']:>9.4f} {min(r['val_loss']):>9.4f} "
            f"{r['state_bytes']:>12,d} {ratio:>9s} {1e3 * r['step_time_s']:>12.1f} {1e3 * r['opt_time_s']:>8.1f} "
            f"{rank:>9s}"
        )
    print("medians: iteration = forward, backward and optimizer step; step = the optimizer step alone")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    model_cfg = SIZES[args.size]
    seq_len = args.seq_len or model_cfg.seq_len
    if args.warmup >= args.steps:
        ap.error(f"--warmup {args.warmup} is not below --steps {args.steps} (the learning rate never peaks): "
                 f"pass --warmup {args.steps // 10}, or any below {args.steps}")  # fmt: skip
    if seq_len > model_cfg.seq_len:
        ap.error(f"--seq-len {seq_len} is longer than the {args.size} model's context ({model_cfg.seq_len})")
    lrs = default_lrs() | args.lr
    unused = [name for name in args.lr if name not in args.optimizers]
    if unused:  # a rate for an optimizer that does not run is a slip: say so rather than drop it
        ap.error(f"--lr {', '.join(unused)}: not in --optimizers ({', '.join(args.optimizers)})")
    missing = missing_main_extra()
    if missing:
        ap.error(f"the main job needs {' and '.join(missing)}: pip install 'adapprox_kernels[main]' "
                 f"(or pip install {' '.join(missing)})")  # fmt: skip
    missing = missing_peers(args.optimizers)
    if missing:  # now, not when its turn comes after the others have trained for minutes
        ap.error("; ".join(missing) + " (or choose others with --optimizers)")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        # The runs' syncs, the GPU name recorded and Adapprox's CUDA graphs (captured on the
        # current device only) all take the current device: make it the one asked for.
        torch.cuda.set_device(device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # before environment() records the count in meta
    out = out_dir(ap, args)
    corpus = load_corpus(ap, args, seq_len)
    print(f"corpus: {len(corpus):,} bytes from {args.data or 'the Python standard library'}; "
          f"model {args.size}; {args.steps} steps of {args.batch_size}x{seq_len} on {args.device}")  # fmt: skip
    meta = dict(environment(args.device), args=vars(args), corpus_bytes=len(corpus))
    runs = []
    for name in args.optimizers:
        cfg = RunConfig(
            optimizer=name, lr=lrs[name], steps=args.steps, warmup=args.warmup, eval_every=args.eval_every,
            eval_batches=args.eval_batches, k_max=args.k_max, device=args.device, seed=args.seed,
        )  # fmt: skip
        data = ByteBatches(corpus, seq_len, args.batch_size, seed=args.seed)
        try:
            runs.append(train_one(cfg, model_cfg, data))
        except Exception as e:  # noqa: BLE001 - one optimizer's failure must not cost the others' runs
            runs.append({"name": name, "lr": cfg.lr, "config": asdict(cfg), "error": f"{type(e).__name__}: {e}"})
            print(f"{name} failed: {runs[-1]['error']}", file=sys.stderr)
        write_results(out / RESULTS, meta, runs)  # after every run: a killed job keeps the finished ones
    print()
    print_table(runs)
    plot_runs(runs, out / PLOT)
    print(f"\nwrote {out / RESULTS} and {out / PLOT}")
    failed = [r["name"] for r in runs if "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        status = main()
        sys.stdout.flush()  # a reader gone (`| head`) shows here, in the try, not at exit
    except BrokenPipeError:  # Python's docs, "Note on SIGPIPE": no traceback, no second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 1
    sys.exit(status)
