"""The README's main job and the diagnostics command, end to end on a tiny budget."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapprox_kernels
from adapprox_kernels.train import __main__ as main_module
from adapprox_kernels.train import optimizers, runner
from adapprox_kernels.train.__main__ import build_parser, main
from adapprox_kernels.train.data import ByteBatches, corpus_files, default_corpus_dir, read_corpus
from adapprox_kernels.train.model import GPT, GPTConfig
from adapprox_kernels.train.plot import plot_runs
from adapprox_kernels.train.runner import RunConfig, environment, train_one, warmup_cosine


def test_diagnostics_command():
    out = subprocess.run([sys.executable, "-m", "adapprox_kernels"], capture_output=True, text=True, check=True).stdout
    assert "adapprox_kernels" in out and "torch" in out
    assert "backends on cpu:" in out and "reference  usable" in out


def test_diagnostics_extension_line(monkeypatch):
    """The extension's line: loaded with the CUDA devices it sees, loaded without a CUDA runtime
    (the reason given), or not loaded (the saved error)."""
    from adapprox_kernels import _extension
    from adapprox_kernels.diagnostics import extension_line

    class Module:
        status = (2, None)

        def cuda_runtime_status(self):
            return self.status

    module = Module()
    monkeypatch.setattr(_extension, "extension_status", lambda: (True, None))
    monkeypatch.setattr(_extension, "extension_module", lambda: module)
    assert extension_line() == "loaded; 2 CUDA device(s)"
    module.status = (0, "no driver")
    assert extension_line() == "loaded, but no CUDA runtime here (no driver)"
    monkeypatch.setattr(_extension, "extension_status", lambda: (False, "ImportError: gone"))
    assert extension_line() == "not loaded (ImportError: gone)"


def test_diagnostics_command_help():
    run = subprocess.run([sys.executable, "-m", "adapprox_kernels", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "usage: python -m adapprox_kernels" in run.stdout
    assert "backends on cpu:" not in run.stdout  # the help, not the report


def test_main_job_tiny(tmp_path, capsys):
    rc = main(
        ["--steps", "4", "--warmup", "2", "--eval-every", "2", "--eval-batches", "1", "--batch-size", "2",
         "--seq-len", "16", "--max-bytes", "50000", "--lr", "adamw=1.5e-3", "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    captured = capsys.readouterr()
    table = captured.out
    for name in ("adapprox", "adamw", "adafactor", "came", "adamem", "adafactor-m", "galore"):
        assert name in table
        # Into a log, not a terminal: a bar's first and last draw (and one every 30 s between, which a
        # slow machine might reach), not one per step and eval (5 here, with a stale count).
        assert captured.err.count(f"{name:>10s}:") <= 3, captured.err
    assert "vs AdamW" in table and "100.0%" in table
    assert "iteration ms" in table and "step ms" in table and "opt ms" not in table  # the README's names
    assert "  0.0015 " in table  # two significant digits, not 2e-03
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert runs["adamw"]["lr"] == 1.5e-3
    assert runs["adapprox"]["state_bytes"] < runs["adamw"]["state_bytes"]
    assert runs["adapprox"]["final_mean_rank"] >= 1 and runs["adapprox"]["ranks"]
    assert runs["galore"]["state_bytes"] > runs["adafactor"]["state_bytes"]  # projector matrices counted
    assert len(runs["adamw"]["val_loss"]) == 2
    assert (tmp_path / "comparison.png").stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison.png", "results.json"]  # no probe left


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_corpus(tmp_path / "missing", 1000)
    (tmp_path / "small.txt").write_text("too short")
    with pytest.raises(ValueError, match="at least"):
        read_corpus(tmp_path / "small.txt", 1000)


@pytest.fixture
def built(monkeypatch):
    """The optimizers ``train_one`` builds, in order."""
    made = []

    def build(*args):
        made.append(optimizers.build_optimizer(*args))
        return made[-1]

    monkeypatch.setattr(runner, "build_optimizer", build)
    return made


def test_state_bytes_count_every_shared_buffer(built):
    # Adapprox keeps the factors of same-shaped layers as views of one buffer per stack.
    model_cfg = GPTConfig(seq_len=16, n_layer=3, n_head=2, d_model=32)
    cfg = RunConfig(
        optimizer="adapprox", lr=2e-3, steps=2, warmup=1, eval_every=2, eval_batches=1, k_max=3, device="cpu"
    )
    out = train_one(cfg, model_cfg, ByteBatches(bytes(range(256)) * 8, 16, 2))
    opt = built[0]
    ptrs = [t.untyped_storage().data_ptr() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    assert len(set(ptrs)) < len(ptrs)  # shared buffers: the case the count got wrong
    assert out["state_bytes"] == opt.state_report().state_bytes


def test_a_progress_bar_into_a_log_redraws_no_stale_count(monkeypatch, capsys):
    """Into a log a bar draws every 30 s; tqdm's monitor thread redrew it every 10 s between
    those draws with the count of the last one ('30/50 [00:40<…]'). Steps of 1 s on tqdm's
    clock, the monitor checking every millisecond of real time."""
    import time

    import tqdm.std
    from tqdm._monitor import TMonitor

    clock = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    monkeypatch.setattr(TMonitor, "_test", {"time": lambda: clock[0]})
    monkeypatch.setattr(tqdm.std.tqdm, "monitor_interval", 0.001)
    monkeypatch.setattr(tqdm.std.tqdm, "monitor", None)  # a new one, with that interval
    data = ByteBatches(bytes(range(256)) * 8, 16, 2)
    batch = data.train_batch

    def slow_batch():
        clock[0] += 1.0
        time.sleep(0.005)  # the monitor's turn
        return batch()

    monkeypatch.setattr(data, "train_batch", slow_batch)
    cfg = RunConfig(
        optimizer="adamw", lr=1e-3, steps=50, warmup=1, eval_every=50, eval_batches=1, k_max=3, device="cpu"
    )
    try:
        train_one(cfg, GPTConfig(seq_len=16, n_layer=1, n_head=2, d_model=32), data)
    finally:
        if tqdm.std.tqdm.monitor is not None:  # the thread this test started
            tqdm.std.tqdm.monitor.exit()
    counts = [int(n) for n in re.findall(r"\| (\d+)/50 \[", capsys.readouterr().err)]  # each draw's step count
    assert counts == [0, 30, 50], counts


def test_corpus_reads_no_more_than_its_cap(tmp_path):
    """A corpus file far larger than ``--max-bytes`` is not read whole (it may not fit in memory)."""
    import tracemalloc

    big = tmp_path / "big.txt"
    with big.open("wb") as f:
        f.write(b"abc" * 10_000)
        f.truncate(64 << 20)  # 64 MiB, sparse
    tracemalloc.start()
    try:
        corpus = read_corpus(big, 20_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert corpus == (b"abc" * 10_000)[:20_000]
    assert peak < 4 << 20, f"peak {peak:,} bytes for a 20,000-byte corpus"


def test_data_folder_under_a_site_packages_path(tmp_path):
    folder = tmp_path / "site-packages" / "corpus"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"x" * 12_000)
    assert read_corpus(folder, 50_000) == b"x" * 12_000
    # the default corpus still leaves out the packages installed inside the standard library
    assert not any("site-packages" in f.relative_to(default_corpus_dir()).parts for f in corpus_files(None))


def test_data_folder_without_text_files(tmp_path):
    (tmp_path / "notes.c").write_bytes(b"x" * 12_000)
    with pytest.raises(ValueError, match=r"no \.py/\.txt/\.md/\.rst files under"):
        read_corpus(tmp_path, 50_000)
    assert ".py/.txt/.md/.rst" in build_parser().format_help()


def test_validation_split_shorter_than_a_window():
    ByteBatches(bytes(20_520), 1024, 2).val_batches(1)  # the size the message asks for is enough
    with pytest.raises(ValueError, match="validation.*at least 20,520 bytes"):
        ByteBatches(bytes(12_000), 1024, 2)  # passes the 10,000-byte minimum, 600 validation bytes


def no_run(*args):
    raise AssertionError("a run started before the usage error was reported")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "adamw=abc"], "positive number"),
        (["--lr", "1e-3"], "expected name=value"),
        (["--lr", "adaprox=3e-3"], "choose from adapprox, adamw"),
        (["--lr", "adamw=1e-3,adamw=2e-3"], "'adamw=2e-3': a second learning rate for adamw"),
        (["--lr", "adamw=1e-3,adapprox=3e-3"], "--lr adapprox: not in --optimizers (adamw)"),
        (["--eval-every", "0"], "--eval-every: expected an integer in [1, 2,147,483,647]"),
        (["--steps", "0"], "--steps: expected an integer in [1, 2,147,483,647]"),
        (["--eval-batches", "0"], "--eval-batches: expected an integer in [1, 2,147,483,647]"),
        (["--batch-size", "0"], "--batch-size: expected an integer in [1, 2,147,483,647]"),
        (["--seq-len", "129"], "longer than the tiny model's context (128)"),
        (["--device", "cuda"], "torch sees 0 CUDA device(s)"),
        (["--device", "gpu"], "expected cpu, cuda or cuda:N"),
        (["--data", "/nonexistent"], "does not exist"),
        (["--data", ""], "--data: an empty path"),  # not the current folder, reported as the default corpus
        (["--out", ""], "--out: an empty path"),  # not results written into the current folder
        (["--lr", "adamw=1e-3", "--lr", "adamw=2e-3"], "--lr: a second learning rate for adamw"),
        (["--k-max", str(2**31)], "--k-max: expected an integer in [1, 2,147,483,647], got '2147483648'"),
        (["--threads", str(2**40)], "--threads: expected an integer in [1, 2,147,483,647]"),
        (["--seed", str(2**64)], "--seed: expected an integer in [-2**63, 2**64)"),
        (["--data", "SMALL"], "need at least 10,000"),
        (["--size", "gpt2-124m", "--seq-len", "1024", "--data", "12K"], "validation (5%) split has 600 bytes"),
        (["--optimizers", ""], "none given; choose from adapprox"),
        (["--optimizers", "adamw,sgd"], "unknown sgd; choose from adapprox"),
        (["--optimizers", "adamw,adapprox,adamw"], "--optimizers: adamw given more than once"),
        (["--out", "SMALL/sub"], "small.txt/sub: Not a directory"),
        (["--out", "SMALL"], "small.txt is a file, not a folder"),
        (["--warmup", "2"], "--warmup 2 is not below --steps 2 (the learning rate never peaks): pass --warmup 0"),
    ],
)
def test_bad_options_are_usage_errors(extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # the same answer on a GPU machine
    monkeypatch.setattr(main_module, "train_one", no_run)  # every one is reported before any run
    (tmp_path / "small.txt").write_bytes(b"x" * 100)
    (tmp_path / "12k.txt").write_bytes(b"x" * 12_000)
    paths = {"SMALL": tmp_path / "small.txt", "SMALL/sub": tmp_path / "small.txt" / "sub", "12K": tmp_path / "12k.txt"}
    extra = [str(paths[a]) if a in paths else a for a in extra]
    base = ["--steps", "2", "--warmup", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
            "--max-bytes", "20000", "--optimizers", "adamw", "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(base + extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_lr_given_twice_keeps_both_flags_rates(tmp_path, monkeypatch):
    """``--lr adamw=1e-3 --lr adapprox=3e-3`` sets both rates; the first flag's is not dropped."""
    lrs = {}

    def record(cfg, model_cfg, data):
        lrs[cfg.optimizer] = cfg.lr
        raise RuntimeError("recorded")

    monkeypatch.setattr(main_module, "train_one", record)
    argv = ["--optimizers", "adamw,adapprox", "--lr", "adamw=1e-3", "--lr", "adapprox=3e-3", "--out", str(tmp_path)]
    assert main(TINY + argv) == 1
    assert lrs == {"adamw": 1e-3, "adapprox": 3e-3}


def test_threads_sets_torchs_thread_count_before_the_runs(tmp_path, monkeypatch):
    """``--threads 1`` runs (and records in meta) one CPU thread: torch's default of one per core
    slows many times over where other work keeps the cores busy. Meta also records the vector
    instructions torch's CPU kernels take: the losses' last digits depend on both."""
    threads, seen = {"count": 7}, []  # torch's own count stays as it is for the other tests

    def record(cfg, model_cfg, data):
        seen.append(torch.get_num_threads())
        raise RuntimeError("recorded")

    monkeypatch.setattr(main_module, "train_one", record)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.update(count=n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads["count"])
    assert main(TINY + ["--optimizers", "adamw", "--threads", "1", "--out", str(tmp_path)]) == 1
    assert seen == [1]
    meta = strict_json(tmp_path / "results.json")["meta"]
    assert meta["threads"] == 1 and meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_cuda_index_becomes_the_current_device(tmp_path, monkeypatch):
    """``--device cuda:1``: the runs' syncs, Adapprox's CUDA graphs (current device only) and the
    recorded GPU name follow the current device, so it is made that one before any run."""
    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(torch.device(device)))
    monkeypatch.setattr(main_module, "environment", lambda device: {})

    def train(cfg, model_cfg, data):
        calls.append("run")
        raise RuntimeError("recorded")

    monkeypatch.setattr(main_module, "train_one", train)
    assert main(TINY + ["--optimizers", "adamw", "--device", "cuda:1", "--out", str(tmp_path)]) == 1
    assert calls == [torch.device("cuda:1"), "run"]


def test_the_peers_import_without_a_warning_line():
    """galore-torch imports bitsandbytes, whose CPU backend logged "Failed to load CPU
    gemm_4bit_forward …" on CPUs with AVX512-BF16, the first line of the job's output: the job
    silences that logger (it runs no 4-bit op)."""
    pytest.importorskip("galore_torch")
    code = "import adapprox_kernels.train.optimizers as o; assert o.missing_peers(list(o.PEER_PACKAGES)) == []"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "Failed to load" not in run.stderr, run.stderr[-2000:]
    import logging

    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() >= logging.ERROR


def test_help_gives_the_readmes_defaults():
    """The README sends readers to ``--help`` for the options it names."""
    text = " ".join(build_parser().format_help().split())
    assert "(default 600)" in text and "default runs/main" in text
    assert "data order, model init and the optimizers' sketch RNGs (default 0)" in text
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "for 600 steps" in readme and "runs/main/results.json" in readme
    assert "`--seed` (data order, model init and the optimizers' sketch RNGs)" in readme


@pytest.fixture
def unwritable():
    """Makes a file or folder this user cannot write: read-only, or, for root (who writes those),
    immutable (``chattr +i``, undone after the test: pytest could not remove it). Returns the
    error's strerror."""
    immutable = []

    def make(path: Path, read_only: bool = True) -> str:
        """``read_only=False``: immutable or skipped (a read-only results.json is replaced)."""
        if read_only:
            path.chmod(0o555 if path.is_dir() else 0o444)
            if not os.access(path, os.W_OK):
                return os.strerror(errno.EACCES)
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("this user cannot make files immutable here")
        immutable.append(path)
        return os.strerror(errno.EPERM)

    yield make
    for path in immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_out_folder_that_refuses_files_is_a_usage_error(tmp_path, monkeypatch, capsys, unwritable):
    out = tmp_path / "read-only"
    out.mkdir()
    reason = unwritable(out)
    monkeypatch.setattr(main_module, "train_one", no_run)
    with pytest.raises(SystemExit) as exit_info:
        main(["--optimizers", "adamw", "--steps", "2", "--warmup", "1", "--max-bytes", "20000", "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"--out {out}: {reason}" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["results.json.partial", "comparison.png", "results.json"])
def test_out_folder_holding_an_unwritable_output_is_a_usage_error(name, tmp_path, monkeypatch, capsys, unwritable):
    """Written in place (a stale partial file, the plot), or an immutable results.json, which the
    rename cannot replace: found before any run, not when the first write or the plot fails
    after the training; the probe changes nothing and leaves nothing."""
    (tmp_path / name).write_bytes(b"kept")
    reason = unwritable(tmp_path / name, read_only=name != "results.json")
    monkeypatch.setattr(main_module, "train_one", no_run)
    with pytest.raises(SystemExit) as exit_info:
        main(TINY + ["--optimizers", "adamw", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    expected = f"--out {tmp_path}: {name} there cannot be written ({reason}); remove it or choose another --out"
    assert expected in capsys.readouterr().err
    assert (tmp_path / name).read_bytes() == b"kept" and [p.name for p in tmp_path.iterdir()] == [name]


def test_results_json_of_another_user_in_a_sticky_folder_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """In a folder with the sticky bit (/tmp's 1777) only the file's owner, the folder's or root
    may rename over it: results.json of another user there opened for writing (or not: EACCES
    passes) and failed at the rename after the first run. This user is made uid 1234 (the file
    another's, the folder a third's where root may chown them); its own file there passes."""
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(0o1777)
    (out / "results.json").write_text("{}")
    monkeypatch.setattr(main_module, "train_one", no_run)
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    try:
        os.chown(out / "results.json", 4321, -1)
        os.chown(out, 5678, -1)
    except PermissionError:
        pytest.skip("this user cannot give files away here")
    with pytest.raises(SystemExit) as exit_info:
        main(TINY + ["--optimizers", "adamw", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "results.json there belongs to another user and the folder is sticky" in capsys.readouterr().err
    os.chown(out / "results.json", 1234, -1)
    assert main_module.unwritable_output(out) is None


@pytest.mark.parametrize("kind", ["read-only", "a link to an immutable file"])
def test_results_json_that_the_rename_replaces_is_not_refused(kind, tmp_path, monkeypatch, unwritable):
    """Replaced by a rename, which needs the folder, not the file (nor the file a link points
    to): no reason to refuse it. Root writes a read-only file: the probe is then given the EACCES
    that other users get."""
    path, target = tmp_path / "results.json", tmp_path / "kept.json"
    if kind == "read-only":
        path.write_text("{}")
        path.chmod(0o444)
        if os.access(path, os.W_OK):
            real_open = os.open

            def as_other_users(file, flags, *args, **kwargs):
                if Path(file) == path and flags & os.O_WRONLY:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
                return real_open(file, flags, *args, **kwargs)

            monkeypatch.setattr(os, "open", as_other_users)
    else:
        target.write_text("{}")
        unwritable(target, read_only=False)
        path.symlink_to(target)

    def fail(cfg, model_cfg, data):
        raise RuntimeError("recorded")

    monkeypatch.setattr(main_module, "train_one", fail)
    assert main(TINY + ["--optimizers", "adamw", "--out", str(tmp_path)]) == 1
    assert strict_json(path)["runs"][0]["error"] == "RuntimeError: recorded" and not path.is_symlink()
    assert kind == "read-only" or target.read_text() == "{}"


@pytest.mark.parametrize("name", ["results.json", "results.json.partial", "comparison.png"])
def test_out_folder_holding_a_folder_of_an_outputs_name_is_a_usage_error(name, tmp_path, monkeypatch, capsys):
    """Found before any run, not when the first write or the plot fails after the training."""
    (tmp_path / name).mkdir()
    monkeypatch.setattr(main_module, "train_one", no_run)
    with pytest.raises(SystemExit) as exit_info:
        main(TINY + ["--optimizers", "adamw", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"--out {tmp_path}: {name} there is not a file; remove it or choose another --out" in capsys.readouterr().err


def test_output_piped_to_a_reader_that_is_gone_ends_quietly(tmp_path):
    """``... | head -3``: Python's docs' way with SIGPIPE, status 1 and no BrokenPipeError traceback.
    The pipe is closed before the job starts and stdout unbuffered: its first line (before any
    run) meets the closed pipe, so the job stops there, at once."""
    read, write = os.pipe()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "adapprox_kernels.train", *TINY, "--optimizers", "adamw", "--out", str(tmp_path)]
    with subprocess.Popen(argv, stdout=write, stderr=subprocess.PIPE, env=env, text=True) as job:
        os.close(read)
        os.close(write)
        err = job.stderr.read()
    assert job.returncode == 1 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert not (tmp_path / "results.json").exists()  # it stopped before the first run


def test_commit_is_the_packages_own(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPPROX_COMMIT", raising=False)
    package = Path(runner.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip("the package is not in a git checkout here")
    monkeypatch.chdir(tmp_path)  # not a checkout: the job may run from anywhere
    assert environment("cpu")["commit"] == head
    monkeypatch.setattr(runner, "__file__", str(tmp_path / "runner.py"))  # a package outside any checkout
    assert environment("cpu")["commit"] == ""


def test_missing_peer_package_is_a_usage_error_before_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "galore_torch", None)  # as if galore-torch were not installed
    monkeypatch.setattr(main_module, "train_one", no_run)
    argv = TINY + ["--optimizers", "adamw,galore", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "galore needs the galore-torch package: pip install galore-torch" in err


def test_commit_only_of_a_checkout_holding_the_package(tmp_path, monkeypatch):
    """An editable install records its checkout's commit; a copy installed in a venv inside some
    other repository records none, rather than that repository's."""
    monkeypatch.delenv("ADAPPROX_COMMIT", raising=False)
    repo = tmp_path / "repo"
    checkout = repo / "adapprox_kernels" / "train"
    installed = repo / ".venv" / "lib" / "site-packages" / "adapprox_kernels" / "train"
    for folder in (checkout, installed):
        folder.mkdir(parents=True)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(runner, "__file__", str(checkout / "runner.py"))
    assert environment("cpu")["commit"] == head
    monkeypatch.setattr(runner, "__file__", str(installed / "runner.py"))
    env = environment("cpu")
    assert env["commit"] == "" and env["adapprox_kernels"] == adapprox_kernels.__version__


def test_schedule_warmup_then_cosine():
    f = warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


TINY = ["--steps", "3", "--warmup", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
        "--max-bytes", "20000"]  # fmt: skip


def strict_json(path: Path):
    """The file parsed as strict JSON: a NaN or Infinity token is an error."""

    def refuse(token):
        raise ValueError(f"{token} in {path.name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_failing_run_is_recorded_and_the_job_goes_on(tmp_path, capsys):
    # AdamW diverges to NaN at this lr; Adapprox refuses the non-finite gradient (nonfinite='raise').
    argv = TINY + ["--optimizers", "adapprox,adamw", "--lr", "adamw=1e6,adapprox=1e6", "--out", str(tmp_path)]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "adapprox failed: FloatingPointError: " in err
    table = {line.split()[0]: line for line in out.splitlines() if line.startswith(("adapprox ", "adamw "))}
    assert "1e+06 failed: FloatingPointError: " in table["adapprox"] and " nan " in table["adamw"]
    runs = {r["name"]: r for r in strict_json(tmp_path / "results.json")["runs"]}
    assert runs["adapprox"]["error"].startswith("FloatingPointError: ") and runs["adapprox"]["lr"] == 1e6
    assert "error" not in runs["adamw"] and runs["adamw"]["final_val_loss"] is None  # NaN, finished
    assert (tmp_path / "comparison.png").stat().st_size > 10_000


def test_results_are_written_after_every_run(tmp_path, monkeypatch):
    def train_then_get_killed(cfg, model_cfg, data):
        if cfg.optimizer == "adafactor":
            raise KeyboardInterrupt  # not an Exception: the job stops, as on Ctrl-C
        return {"name": cfg.optimizer, "lr": cfg.lr, "val_loss": [2.0], "eval_steps": [3], "ranks": []}

    monkeypatch.setattr(main_module, "train_one", train_then_get_killed)
    with pytest.raises(KeyboardInterrupt):
        main(TINY + ["--optimizers", "adamw,adafactor", "--out", str(tmp_path)])
    assert [r["name"] for r in strict_json(tmp_path / "results.json")["runs"]] == ["adamw"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no partial file left


def test_results_json_is_strict_with_nan_losses(tmp_path):
    assert main(TINY + ["--optimizers", "adamw", "--lr", "adamw=1e6", "--out", str(tmp_path)]) == 0
    runs = strict_json(tmp_path / "results.json")["runs"]
    assert runs[0]["final_val_loss"] is None and runs[0]["val_loss"] == [None]
    plot_runs(runs, tmp_path / "again.png")  # the figure can be redrawn from the file
    assert (tmp_path / "again.png").stat().st_size > 10_000


def test_galore_projects_only_the_attention_and_mlp_weights():
    model = GPT(GPTConfig(seq_len=16, n_layer=2, n_head=2, d_model=32))
    opt = optimizers.build_optimizer("galore", model, 1e-3, "cpu", 3)
    names = {id(p): n for n, p in model.named_parameters()}
    projected = sorted(names[id(p)] for g in opt.param_groups if "rank" in g for p in g["params"])
    expected = sorted(f"blocks.{i}.{m}.weight" for i in range(2) for m in ("qkv", "proj", "fc", "fc_out"))
    assert projected == expected
    grouped = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(names.values())  # every parameter once: embeddings, vectors via AdamW
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)


def test_seed_reaches_the_optimizers_own_rngs(built):
    model_cfg = GPTConfig(seq_len=16, n_layer=1, n_head=2, d_model=32)
    for name, seed in [("adapprox", 7), ("adamem", 7), ("adapprox", 0)]:
        cfg = RunConfig(
            optimizer=name, lr=1e-3, steps=1, warmup=1, eval_every=1, eval_batches=1, k_max=3, device="cpu", seed=seed
        )  # fmt: skip
        train_one(cfg, model_cfg, ByteBatches(bytes(range(256)) * 8, 16, 2))
    assert [opt._seed for opt in built] == [7, 7, 0]


@pytest.mark.parametrize("module", ["tqdm", "matplotlib"])
def test_missing_main_extra_is_a_usage_error_before_any_run(module, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    monkeypatch.setattr(main_module, "train_one", no_run)
    with pytest.raises(SystemExit) as exit_info:
        main(TINY + ["--optimizers", "adamw", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert f"needs {module}: pip install 'adapprox_kernels[main]' (or pip install {module})" in err


def test_weight_decay_is_as_documented():
    model = GPT(GPTConfig(seq_len=16, n_layer=1, n_head=2, d_model=32))
    decay = {
        name: max(g["weight_decay"] for g in optimizers.build_optimizer(name, model, 1e-3, "cpu", 3).param_groups)
        for name in optimizers.OPTIMIZERS
    }  # fmt: skip
    assert decay == {"adapprox": 0.1, "adamw": 0.1, "came": 0.01, "adafactor": 0.0, "adamem": 0.0,
                     "adafactor-m": 0.0, "galore": 0.0}  # fmt: skip
    stated = "AdamW and Adapprox 0.1 on matrices and embeddings, CAME 0.01"
    assert stated in " ".join(optimizers.__doc__.split())
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "Weight decay differs" in readme and "AdamW and Adapprox 0.1, CAME 0.01, the others none" in readme
