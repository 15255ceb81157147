"""The plumbing of the paper-table scripts in bench/: counting, timing and result files.

The scripts' numbers are only as good as these pieces, so they are checked on small inputs
here (fast, default run); the scripts themselves run from bench/README.md."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from bench import common, peers
from bench.fig2_rank_sweep import adafactor_estimate, adafactor_factors
from bench.table2_8_state_memory import adapprox_formula
from triton_env import interpreter_refuses_numpy

# The tests that run a bench script under Triton's interpreter (on CPU, GPU machine or not).
needs_interpreter = pytest.mark.skipif(interpreter_refuses_numpy() is not None, reason=str(interpreter_refuses_numpy()))


def test_time_call_cpu_quantiles_are_ordered():
    t = common.time_call(lambda: torch.randn(64, 64) @ torch.randn(64, 64), "cpu", warmup=1, reps=7)
    assert t["reps"] == 7 and t["timer"] == "time.perf_counter"
    assert 0 < t["p20_s"] <= t["median_s"] <= t["p80_s"]


def test_quantile_interpolates_like_numpy():
    xs = [1.0, 2.0, 4.0, 8.0, 16.0]
    assert common._quantile(xs, 0.5) == 4.0
    assert common._quantile(xs, 0.2) == pytest.approx(1.8)  # numpy.quantile(xs, 0.2)
    assert common._quantile(xs, 0.8) == pytest.approx(9.6)


def test_write_results_round_trip(tmp_path):
    rows = [dict(m=1024, median_s=0.5, **common.measured()), dict(m=8192, **common.not_measured("no GPU"))]
    meta = common.metadata("cpu", note="test")
    path = common.write_results("unit", "cpu", rows, meta, tmp_path, extra_key=[1, 2])
    data = json.loads(path.read_text())
    assert path.name == "unit_cpu.json" and data["rows"] == rows and data["extra_key"] == [1, 2]
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["note"] == "test"
    lines = list(csv.DictReader((tmp_path / "unit_cpu.csv").read_text().splitlines()))
    assert [r["status"] for r in lines] == ["measured", common.NOT_MEASURED]
    assert lines[1]["reason"] == "no GPU" and lines[1]["median_s"] == ""  # never filled in
    assert all(r["device"] == meta["device"] and r["commit"] == meta["commit"] for r in lines)


@pytest.mark.parametrize("beta1", [0.9, 0.0])
@pytest.mark.parametrize("k", [1, 3])
def test_adapprox_closed_form_matches_real_state(beta1, k):
    # factored, dense because min(m, n) <= k + p, a vector, and a folded 3-D parameter
    shapes = [(40, 30), (7, 50), (30,), (6, 4, 5), (33, 9, 2)]
    named = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter(torch.randn(shape))
        p.grad = torch.randn(shape)
        named.append((f"p{i}", p))
    opt = peers.build("adapprox", named, beta1=beta1, k=k, backend="reference")
    opt.step()
    held, logical = peers.state_bytes(opt)
    assert held == logical == sum(adapprox_formula(s, k, beta1) for s in shapes)


def test_galore_projector_keeps_its_full_svd_factor_alive():
    p = torch.nn.Parameter(torch.randn(64, 32))
    p.grad = torch.randn(64, 32)
    opt = peers.build("galore", [("blocks.0.fc.weight", p)], galore_rank=4)
    opt.step()
    held, logical = peers.state_bytes(opt)
    # m >= n: GaLore projects from the right with Vh[:4] (4 × 32), a view of the 32 × 32 Vh.
    assert logical == 4 * (2 * 64 * 4 + 4 * 32)  # exp_avg, exp_avg_sq (64 × 4) and the projector
    assert held - logical == 4 * (32 * 32 - 4 * 32)


def test_gpt2_shapes_match_the_papers_parameter_counts():
    # The paper's AdamW memory is 8 bytes per parameter: 949.40, 2,707.09 and 7,089.92 MiB.
    for size, mib in (("gpt2-124m", 949.40), ("gpt2-345m", 2707.09), ("gpt2-1.1b", 7089.92)):
        kinds = peers.param_kinds(size)
        total = sum(count * math.prod(shape) for (_, shape), count in kinds.items())
        assert total == sum(p.numel() for p in peers.meta_model(size).parameters())
        assert round(8 * total / 2**20, 2) == mib


def test_adafactor_factorization_is_torchs_and_exact_on_rank_one():
    row, col = torch.rand(20, 1) + 0.1, torch.rand(1, 13) + 0.1
    v = row @ col
    row_var, col_var = adafactor_factors(v)
    torch.testing.assert_close(row_var, v.mean(dim=1, keepdim=True), rtol=1e-5, atol=0)
    torch.testing.assert_close(col_var, v.mean(dim=0, keepdim=True), rtol=1e-5, atol=0)
    torch.testing.assert_close(adafactor_estimate(row_var, col_var), v, rtol=1e-4, atol=0)
    noisy = v + 0.5 * torch.rand(20, 13)
    assert (noisy - adafactor_estimate(*adafactor_factors(noisy))).norm() > 1e-3 * noisy.norm()


def test_product_precision_study_runs_on_cpu(tmp_path, monkeypatch):
    """The shadow study's CPU path (emulated tf32) end to end, a few steps of the tiny model; the
    shadow that differs only by sketch seed must differ, the others start from the same sketch.
    The file goes to a folder ``--out`` names even if it does not exist yet, with the metadata
    of bench/common.py (device, torch / triton versions, commit)."""
    import sys

    from adapprox_kernels import backends
    from bench import product_precision

    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    monkeypatch.setattr(backends, "_PREFERENCE", list(backends._PREFERENCE))
    out = tmp_path / "new"
    argv = ["product_precision.py", "--size", "tiny", "--steps", "3", "--summary-from", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    product_precision.main()
    data = json.loads((out / "product_precision_cold_cpu.json").read_text())
    meta = common.metadata("cpu")
    assert data["meta"]["device"] and all(data["meta"][k] == meta[k] for k in ("torch", "triton", "commit"))
    labels = {"fp32_seed1", "trunc_all", "trunc_range", "nearest_all", "nearest_range"}
    assert labels <= set(data["summary"]) and len(data["rows"]) == 3
    assert data["rows"][-1]["fp32_seed1"]["param_gap"] > 0
    assert all(math.isfinite(data["summary"][label]["mean_xi"]) for label in labels)


@pytest.mark.parametrize("steps, summary_from", [("3", "20"), ("0", "1")])
def test_product_precision_summary_steps_are_checked_before_training(steps, summary_from, monkeypatch, capsys):
    """A short run (``--steps`` below the default ``--summary-from`` 20) is a usage error up
    front, not a StatisticsError after the whole study has trained with nothing written."""
    import sys

    from bench import product_precision

    monkeypatch.setattr(product_precision, "train", lambda *a: pytest.fail("trained before the usage error"))
    argv = ["product_precision.py", "--size", "tiny", "--steps", steps, "--summary-from", summary_from]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        product_precision.main()
    assert exit_info.value.code == 2 and "--summary-from" in capsys.readouterr().err


def test_compare_step_takes_turns_and_records_every_run(tmp_path, monkeypatch):
    """compare_step's parent (the children need a GPU): each round runs the baseline, this
    checkout and fused AdamW, the order flipping every round; the file keeps every raw time."""
    import subprocess
    import sys
    import types

    from bench import compare_step

    seen, times, real_run = [], iter([4.0, 5.0, 1.0, 1.1, 5.5, 4.5]), subprocess.run

    def child(cmd, **kw):
        if cmd[0] == "git":  # the metadata's commit
            return real_run(cmd, **kw)
        seen.append((cmd[3], cmd[4]))
        return types.SimpleNamespace(stdout=json.dumps({"ms": next(times), "package": cmd[3]}) + "\n")

    monkeypatch.setattr(subprocess, "run", child)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common, "device_name", lambda device: "test")
    argv = ["compare_step.py", "--baseline", str(tmp_path), "--rounds", "2", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    compare_step.main()
    base, here = str(tmp_path.resolve()), str(compare_step.ROOT)
    runs = [(base, "adapprox"), (here, "adapprox"), (here, "adamw_fused")]
    assert seen == runs + runs[::-1]
    (path,) = tmp_path.glob("compare_step_gpt2-124M_k1_*.json")
    record = json.loads(path.read_text())
    assert record["ms_per_step"] == {"baseline": [4.0, 4.5], "current": [5.0, 5.5], "adamw_fused": [1.0, 1.1]}
    assert record["median_ms"]["current"] == 5.25


@needs_interpreter
@pytest.mark.parametrize("schedule", ["none", "onecycle"])
def test_host_step_times_a_graphed_step_with_the_replays_stubbed(tmp_path, schedule):
    """bench/host_step.py on a tiny GPT-2 layout: every step replays (stubbed) graphs, reads
    the device once, and the two parts it reports fit inside the step; with OneCycleLR writing
    a new α and β1 every step, no call runs without its graph either."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "bench/host_step.py", "--layers", "1", "--width", "16", "--steps", "3",
           "--out", str(tmp_path), "--schedule", schedule]  # fmt: skip
    subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, check=True, capture_output=True)
    (path,) = tmp_path.glob("host_step_1x16_*.json")
    record = json.loads(path.read_text())
    assert record["schedule"] == schedule
    assert record["reads"] == 1 and record["graph_calls"] >= 3  # S-RSI per factored shape, dense sums, updates
    assert record["graphed_calls"] > record["graph_calls"]  # the updates' batch holds one call per bucket
    assert record["eager_calls"] == 0
    assert 0 < record["before_first_read_ms"] + record["after_last_read_ms"] <= record["ms"]


def test_traffic_bound_counts_bytes_as_the_step_moves_them():
    """bench/traffic_bound.py: a factored matrix moves G once per pass and W, M twice; dense
    parameters (a vector, a matrix too small to factor) G twice, V three times, W and M twice."""
    from bench.traffic_bound import Step, adamw_bytes, adapprox_bytes, thin_bytes

    shapes = [(20, 30), (30,), (3, 50)]  # min(3, 50) <= k_max + p: dense
    step = Step("", power_iters=2, k=2, oversample=1)
    assert adamw_bytes(shapes) == 780 * 7 * 4
    assert adapprox_bytes(shapes, step) == 600 * (5 * 4 + 4 * 4) + 180 * (2 * 4 + 3 * 4 + 4 * 4)
    no_momentum = Step("", power_iters=2, k=2, momentum=False, oversample=1)
    assert adapprox_bytes(shapes, no_momentum) == 600 * (5 * 4 + 2 * 4) + 180 * (2 * 4 + 3 * 4 + 2 * 4)
    assert adapprox_bytes(shapes, step, param=2, grad=2) == 600 * (5 * 2 + 4 * 2) + 180 * (2 * 2 + 3 * 4 + 4 * 2)
    assert thin_bytes(shapes, step) == 4 * (20 + 30) * 3  # the factored matrix's (m + n) x (k + p), fp32


def test_traffic_bound_says_a_cpu_bench_step_file_has_nothing_to_compare(tmp_path, monkeypatch):
    """``--results`` with the file bench_step.py writes without a GPU (its ``gpu`` part a
    "NOT MEASURED" line): a message, not a traceback, and no file claiming to be a GPU's."""
    import sys

    from bench import traffic_bound

    results = tmp_path / "bench_step_cpu.json"
    results.write_text(json.dumps({"meta": common.metadata("cpu"), "gpu": "NOT MEASURED: no CUDA device in this run"}))
    monkeypatch.setattr(sys, "argv", ["traffic_bound.py", "--results", str(results), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        traffic_bound.main()
    assert "no GPU measurements" in str(exit_info.value.code) and "NOT MEASURED" in str(exit_info.value.code)
    assert not (tmp_path / "out").exists()


@needs_interpreter
def test_warm_start_runs_as_a_script_without_triton_interpret():
    """``python bench/warm_start.py`` on a machine without a GPU, TRITON_INTERPRET unset: the
    script turns the interpreter on before triton is imported, and the Triton backend's own
    pass count (the last column) is measured."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "bench/warm_start.py"], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout.splitlines()[1:5]  # the four configurations under the header
    assert [line.split()[-1] for line in table] == [line.split()[-2] for line in table]  # measured = counted


def test_warm_start_on_the_tiny_gpts_gradients_summarizes_every_matrix_step(monkeypatch):
    """``--gradients tiny-gpt``: the main job's GPT (here 1 layer, 16 wide) trained by its AdamW
    gives its 2-D parameters' gradients, and each config's summary counts every matrix of every
    step after the skip, each over its own SVD optimum (so never below it), though same-shaped
    matrices (pos and proj here) share a bucket out of the parameters' order."""
    from adapprox_kernels.train.model import GPTConfig
    from bench import warm_start

    monkeypatch.setattr(warm_start, "measured_triton_passes", lambda *args: None)  # the other test's
    stream = warm_start.record_gpt_gradients(3, cfg=GPTConfig(seq_len=16, n_layer=1, n_head=2, d_model=16),
                                             batch_size=2, max_bytes=20_000)  # fmt: skip
    assert [tuple(g.shape) for g in stream[0]] == [(256, 16), (16, 16), (48, 16), (16, 16), (64, 16), (16, 64)]
    result = warm_start.run(steps=3, skip=1, rank=2, gradients="tiny-gpt", stream=stream)
    assert result["setup"]["rank"] == 2 and "tiny GPT" in result["setup"]["gradients"]
    for r in result["configs"].values():
        s = r["matrix_steps"]
        assert s["count"] == 2 * 6
        assert 1 - 1e-4 < s["xi_over_svd_optimum_mean"] <= s["xi_over_svd_optimum_max"]
        assert s["fraction_above_1.5x"] == s["above_1.5x"] / 12
    assert "cold l=5 (default)" in warm_start.matrix_step_summary([result])
    per_matrix = warm_start.xi_trace(stream, warm_start.CONFIGS["cold l=5 (default)"], rank=2)["per_matrix"]
    assert min(map(min, per_matrix)) > 1 - 1e-4  # Eckart–Young: no rank-2 V beats its own SVD


def test_orthonormalize_out_may_be_a_bare_file_name(monkeypatch, tmp_path):
    """``bench_orthonormalize.py --out FILE`` names the JSON file; a name without a folder is
    written to the current one."""
    from bench import bench_orthonormalize

    monkeypatch.chdir(tmp_path)
    args = ["--device", "cpu", "--models", "gpt2-124m", "--layers", "1", "--ranks", "1", "--benches", "orthonormalize",
            "--reps", "1", "--out", "orth.json"]  # fmt: skip
    bench_orthonormalize.main(args)
    data = json.loads((tmp_path / "orth.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"cholqr_torch", "qr_batched", "qr_loop"}
    assert data["environment"]["commit"] == common.metadata("cpu")["commit"]


def test_kernel_resources_reads_registers_and_pipelining_from_sm90_code(tmp_path):
    """bench/kernel_resources.py compiles a launch for sm_90 with triton's ptxas (no GPU) and
    reads what the code costs an SM. The dense sums kernel has no loop to pipeline, so its
    stage count cannot change its code."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "bench/kernel_resources.py", "--only", "dense sums", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = tmp_path.glob("kernel_resources_sm90_triton*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["grads"] for r in rows] == ["fp32", "bf16"]
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["spilled_bytes"] >= 0
        assert r["programs_per_sm"] == min(65536 // (128 * r["registers"]), 32)  # 4 warps, no shared memory
        assert r["loops"] == 0 and not r["stages_change_code"]
    assert "| dense sums | bf16 |" in path.with_suffix(".md").read_text()


def test_kernel_resources_compares_code_not_debug_sections():
    """Whether the stage count changes a kernel's code is read by comparing two compilations'
    PTX. Their DWARF names the source's folder, and Triton's cache serves a kernel compiled
    from another checkout of the same code (same source hash): that must not count as a
    change, or a loop-free kernel "depends on its stages"."""
    import os
    import subprocess
    import sys

    script = (
        "from bench.kernel_resources import _code\n"
        "body = '.visible .entry k()\\n{\\n\\tret;\\n}\\n'\n"
        "debug = lambda path: '\\t.section\\t.debug_str\\n\\t{\\n' + ''.join(f'.b8 {ord(c)}\\n' for c in path)"
        " + '\\t}\\n'\n"
        "assert _code(body + debug('/tmp/a-clone')) == _code(body + debug('/tmp/another-clone'))\n"
        "assert _code(body + debug('/tmp/a-clone')) != _code(body.replace('ret', 'exit') + debug('/tmp/a-clone'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


# cuobjdump -sass as it prints a main loop over G's columns with a rank loop inside (encodings on
# the next line, the program ending in a branch to itself).
SASS_LOOPS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                  /* 0x00000a00ff017b82 */
                                                                           /* 0x000e220000000800 */
        /*0010*/                   FFMA R2, R3, R4, R2 ;
        /*0020*/                   LDG.E.128 R4, desc[UR8][R2.64] ;
        /*0030*/                   FFMA R5, R6, R7, R5 ;
        /*0040*/                   LDS.128 R8, [R9+UR4+0x10] ;
        /*0050*/               @P0 BRA 0x30 ;
        /*0060*/                   HGMMA.64x16x8.F32.TF32 R32, R52, gdesc[UR48], RZ, !UPT ;
        /*0070*/              @!P1 BRA 0x20 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
"""


def test_sass_mix_counts_the_main_loop_and_its_rank_loop_k_times():
    """bench/sass_mix.py: the main loop is the outermost backward branch's range, a loop inside it
    runs k times per iteration, and the counts become clocks per element of G at sm_90 rates."""
    from bench.sass_mix import loops, main_loop, mix, parse

    code = parse(SASS_LOOPS)
    assert [op for _, op, _ in code][:3] == ["MOV", "FFMA", "LDG.E.128"] and len(code) == 10
    assert loops(code) == [(0x30, 0x50), (0x20, 0x70)]  # not the closing branch to itself
    counts = main_loop(code, trips=8)
    assert counts == {"LDG.E.128": 1, "FFMA": 8, "LDS.128": 8, "BRA": 9, "HGMMA.64x16x8.F32.TF32": 1}
    out = mix(counts, {op: args for _, op, args in code}, warps=4, elements=128 * 64)
    per = 4 / (128 * 64)  # one instruction of each of the 4 warps, over the tile's elements
    assert out["clocks"]["issue"] == pytest.approx(27 * per / 4)
    assert out["clocks"]["fma"] == pytest.approx(8 * per / 4)
    assert out["clocks"]["lsu"] == pytest.approx(9 * per)  # loads of either kind: one per clock
    assert out["clocks"]["tensor"] == pytest.approx(64 * 16 * 8 / 1024 / (128 * 64))  # one HGMMA per warpgroup
    # LDS.128: 16 bytes a lane; HGMMA's B operand, 16 x 8 tf32, from shared memory
    assert out["shared_bytes_per_element"] == pytest.approx((8 * 4 * 32 * 16 + 16 * 8 * 4) / (128 * 64))
    two_inside = SASS_LOOPS.replace("FFMA R5, R6, R7, R5", "@P3 BRA 0x20").replace("@P0 BRA 0x30", "@P0 BRA 0x40")
    with pytest.raises(ValueError, match="2 loops inside the main loop"):  # which one runs k times?
        main_loop(parse(two_inside), 8)


def test_sass_mix_models_the_default_products_from_sm90_code(tmp_path):
    """bench/sass_mix.py compiles the default product launches at rank 8 for sm_90 (no GPU),
    finds each one's main loop in its SASS and sets the model next to the H100's measurement."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "bench/sass_mix.py", "--only", "default", "--ranks", "8", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    if run.returncode != 0 and ("ptxas" in run.stderr or "cuobjdump" in run.stderr) and "not found" in run.stderr:
        pytest.skip("no ptxas or cuobjdump in this triton install")
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = tmp_path.glob("sass_mix_sm90_triton*.json")
    record = json.loads(path.read_text())
    rows = record["rows"]
    labels = ("V @ X, first pass (+ sums)", "V @ X", "Vᵀ @ Y")
    assert [(r["launch"], r["grads"]) for r in rows] == [(label, g) for label in labels for g in ("fp32", "bf16")]
    for r in rows:
        assert any(op.startswith("HGMMA") for op in r["counts"]) and r["barriers"] > 0
        assert 0 < r["bound"] <= 1 and r["busiest"] in r["clocks"]
        assert r["memory_clocks"] == pytest.approx((4 if r["grads"] == "fp32" else 2) * 132 * 1.98e9 / 2.9e12)
        assert set(r["measured_h100"]) == {"gpt2-345M", "gpt2-124M"}
    assert record["meta"]["model"].startswith("static")
    assert "| V @ X | 8 | bf16 | default (tf32x3) |" in path.with_suffix(".md").read_text()


def test_tune_blocks_times_the_pipelined_rebuilds_over_stages_only():
    """bench/tune_blocks.py: stage counts are swept only where they change the code (the rank
    loop unrolled, or a dot); each default launch configuration is among the configurations
    swept; ``--rebuild`` picks the rebuilds."""
    from bench.tune_blocks import DEFAULTS, product_configs, same_code

    from adapprox_kernels.kernels._launch import Blocks

    configs = product_configs(quick=True)
    loop = [c for c in configs if not c.unroll and not c.dot_from]
    assert len({c.stages for c in loop}) == 1
    assert {c.stages for c in configs if c.unroll} == {c.stages for c in configs if c.dot_from} == {2, 3}
    assert not any(c.unroll and c.dot_from for c in configs)
    assert product_configs(quick=True, rebuilds=("loop", "dot")) == [c for c in configs if not c.unroll]
    for name, default in DEFAULTS.items():
        if name != "apply_update":
            assert any(same_code(c, default) for c in loop), name
    assert same_code(Blocks(64, 64, 64, 4, 2), Blocks(64, 64, 64, 4, 3))
    assert not same_code(Blocks(64, 64, 64, 4, 2, 16), Blocks(64, 64, 64, 4, 3, 16))
    assert not same_code(Blocks(64, 64, 64, 4, 2), Blocks(64, 64, 64, 4, 2, 16))
    assert not same_code(Blocks(64, 64, 64, 4, 2, dot_from=1), Blocks(64, 64, 64, 4, 3, dot_from=1))
    assert not same_code(Blocks(64, 64, 64, 4, 2), Blocks(64, 64, 64, 4, 2, dot_from=1))
    # At rank 1 the JIT makes K the constant 1: no rank loop is left, the main loop is pipelined
    # and the stage count changes the code (test_rank_one_products_are_pipelined), so it is swept.
    assert same_code(Blocks(64, 64, 64, 4, 2), Blocks(64, 64, 64, 4, 3), k=8)
    assert not same_code(Blocks(64, 64, 64, 4, 2), Blocks(64, 64, 64, 4, 3), k=1)
    at_one = product_configs(quick=True, k=1)
    assert {c.stages for c in at_one if not c.unroll and not c.dot_from} == {2, 3}
    for name, default in DEFAULTS.items():
        if name != "apply_update":
            assert any(same_code(c, default, k=1) for c in at_one), name


@pytest.mark.parametrize("script", ["profile_step.py", "compare_step.py"])
def test_gpu_scripts_say_not_measured_without_a_gpu(script, tmp_path):
    """As tune_blocks.py does: a line saying so, not a CUDA traceback (or a child's), and
    profile_step.py's documented ``--size`` is one it accepts."""
    import os
    import re
    import subprocess
    import sys

    from bench import profile_step

    args = {"profile_step.py": ["--size", re.search(r"--size (\S+?)\]", profile_step.__doc__).group(1)],
            "compare_step.py": ["--baseline", str(tmp_path)]}[script]  # fmt: skip
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == f"NOT MEASURED: bench/{script} needs a CUDA device"


def test_table1_console_shows_per_matrix_times_as_its_table_does(monkeypatch, capsys):
    from adapprox_kernels.backends import BACKENDS
    from bench import table1_srsi_time

    monkeypatch.setattr(table1_srsi_time, "BACKENDS", {"reference": BACKENDS["reference"]})
    rows = table1_srsi_time.time_rows(32, 2, 4, torch.device("cpu"), 0, {})
    console = capsys.readouterr().out
    (batched,) = [r for r in rows if r["batch"] == 4]
    per_matrix = {key: batched[f"per_matrix_{key}"] for key in ("median_s", "p20_s", "p80_s")}
    assert common.fmt_time(per_matrix) in console  # as the .md shows it
    assert common.fmt_time(batched) not in console  # the whole call's time, ×4


def test_table1_takes_a_rank_the_paper_has_no_row_for(monkeypatch, tmp_path):
    """``--ranks`` takes any k: one without a paper row gets its own rows, plot and table."""
    from adapprox_kernels.backends import BACKENDS
    from bench import table1_srsi_time

    monkeypatch.setattr(table1_srsi_time, "BACKENDS", {"reference": BACKENDS["reference"]})
    monkeypatch.setattr(table1_srsi_time, "SIZES", (32,))
    monkeypatch.setattr(table1_srsi_time, "CPU_SIZES", (32,))
    assert table1_srsi_time.main(["--ranks", "2", "--batch", "2", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "table1_srsi_time_cpu.md").read_text()
    assert "| 2 | reference batched ×2 |" in md and "paper" not in md
    assert (tmp_path / "table1_srsi_time_cpu.png").stat().st_size > 0


@pytest.mark.parametrize("script", ["table6_7_error_ratio", "fig2_rank_sweep"])
def test_an_unknown_size_is_refused_before_computing(script, tmp_path):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"bench.{script}").main(["--size", "bogus", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_bench_step_adamw_fused_row_is_fused_on_any_device():
    from bench.bench_step import optimizer_factories

    p = torch.nn.Parameter(torch.randn(4, 4))
    assert optimizer_factories((1,), "reference")["adamw_fused"]([p]).defaults["fused"]


@needs_interpreter
@pytest.mark.slow
def test_bench_step_smoke_finishes_on_cpu():
    """``--smoke`` runs anywhere; on CPU under the Triton interpreter, where a step takes seconds:
    about 80 s here (with 15 timed calls of each, over 4 minutes)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "bench/bench_step.py", "--smoke"], cwd=Path(__file__).resolve().parents[1],
                         env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "adapprox_k2_warm_graphs_ieee" in run.stdout and "apply_update (no momentum)" in run.stdout
    assert "adapprox_k2_warm_graphs_onecycle" in run.stdout and "adapprox_k2_warm_graphs_bf16_sr" in run.stdout


def test_fig3_4_summarizes_a_main_job_with_a_failed_and_a_diverged_run():
    """The main job records a run that raised as ``{"error": …}`` and a diverged run's NaN
    losses as null: the summary leaves the first out and shows the second's losses as —."""
    from bench.fig3_4_training import markdown, summary_rows

    runs = [
        {"name": "adamw", "lr": 1e6, "final_val_loss": None, "val_loss": [None, None], "state_bytes": 10,
         "step_time_s": 0.1, "opt_time_s": 0.01},
        {"name": "adapprox", "lr": 1e6, "error": "FloatingPointError: non-finite gradient"},
    ]  # fmt: skip
    rows = summary_rows(runs)
    assert [r["optimizer"] for r in rows] == ["adamw"] and rows[0]["best_val_loss"] is None
    assert "| adamw | 1e+06 | — | — | 10 | 100.0% |" in markdown(rows, {"args": {}})


def test_table4_end_to_end_rows_take_a_main_job_with_a_failed_run(tmp_path):
    """The main job records a run that raised as ``{"error": …}`` without times: Table 4's
    end-to-end rows say it was not measured and why, instead of a KeyError after the timing."""
    from bench.table4_step_time import end_to_end_rows, markdown

    runs = [{"name": "adamw", "lr": 2e-3, "step_time_s": 0.15, "opt_time_s": 0.005},
            {"name": "adapprox", "lr": 1e6, "error": "FloatingPointError: non-finite gradient"}]  # fmt: skip
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": {"device": "cpu", "args": {"size": "tiny"}}, "runs": runs}))
    rows = end_to_end_rows([path])
    assert [r["status"] for r in rows] == ["measured", common.NOT_MEASURED]
    assert "FloatingPointError" in rows[1]["reason"]
    block = dict(size="gpt2-124m", scope="block", label="adamw", median_s=1e-3, p20_s=1e-3, p80_s=1e-3,
                 **common.measured())  # fmt: skip
    md = markdown([block, *rows], "block")
    assert "| adamw | 150 ms | 5 ms | 1.81 s |" in md and "| adapprox | the run failed: FloatingPointError" in md


@pytest.mark.parametrize(
    "extra, message",
    [(["--threads", "0"], "--threads 0: expected at least 1"), (["--device", "foo"], "--device foo: expected cpu"),
     (["--device", "mps"], "--device mps: expected cpu"), (["--out", "FILE/sub"], "Not a directory")],
)  # fmt: skip
def test_common_options_are_checked_before_measuring(extra, message, tmp_path):
    """A bad --threads, --device or --out is a one-line error before a script measures anything
    (--out was only created when the results were written, minutes later)."""
    (tmp_path / "file").write_text("")
    extra = [str(tmp_path / "file" / "sub") if a == "FILE/sub" else a for a in extra]
    args = common.parser("test").parse_args(["--out", str(tmp_path / "out"), *extra])
    with pytest.raises(SystemExit, match=message):
        common.setup(args)


def test_fig3_4_from_a_missing_file_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """``--from`` a path that does not exist (a typo) is refused, not replaced by a rerun of the
    shortened main job whose figure would then stand for the file named."""
    from bench import fig3_4_training

    monkeypatch.setattr(fig3_4_training, "shortened_job", lambda *a: pytest.fail("ran the shortened job"))
    with pytest.raises(SystemExit) as exit_info:
        fig3_4_training.main(["--from", str(tmp_path / "typo.json"), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "typo.json: no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name,given,passed,options",
    [
        # adapprox=3e-3 is --lr's value, not an option
        (None, ["warm_start=True", "--lr", "adapprox=3e-3", "truncation='rayleigh_ritz'", "--seed", "1"],
         ["--lr", "adapprox=3e-3", "--seed", "1"], {"warm_start": True, "truncation": "rayleigh_ritz"}),
        # -1 is --seed's value, not an option whose value warm_start=True would be
        (None, ["--seed", "-1", "warm_start=True"], ["--seed", "-1"], {"warm_start": True}),
        ("adamem", ["--steps", "40", "--optimizer", "adamem", "momentum_transfer='rotate'", "update_proj_gap=50"],
         ["--steps", "40"], {"momentum_transfer": "rotate", "update_proj_gap": 50}),
    ],
)  # fmt: skip
def test_main_job_variants_hands_its_options_to_the_optimizer(name, given, passed, options, monkeypatch, tmp_path):
    """bench/main_job_variants.py: the main job with one optimizer alone (Adapprox unless
    ``--optimizer`` names another: docs/adamem.md's keep/rotate runs), each ``key=value`` in
    every group of the optimizer it builds, the other arguments passed on; the options are
    recorded in the results file's meta (else its name would be their only record); the other
    optimizers are left as they were."""
    import json

    from bench import main_job_variants

    from adapprox_kernels.train import optimizers
    from adapprox_kernels.train.model import GPT, GPTConfig

    name = name or "adapprox"
    for each in optimizers.OPTIMIZERS:
        monkeypatch.setitem(optimizers.OPTIMIZERS, each, optimizers.OPTIMIZERS[each])
    others = {k: v for k, v in optimizers.OPTIMIZERS.items() if k != name}
    seen = []

    def main(argv):
        seen.append(argv)
        (tmp_path / "results.json").write_text(json.dumps({"meta": {"commit": "x"}, "runs": []}))
        return 0

    monkeypatch.setattr(main_job_variants, "main", main)
    assert main_job_variants.run([str(tmp_path), *given]) == 0
    assert seen == [["--optimizers", name, "--out", str(tmp_path), *passed]]
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta == {"commit": "x", f"{name}_options": options}
    model = GPT(GPTConfig(seq_len=16, n_layer=1, n_head=2, d_model=32))
    opt = optimizers.build_optimizer(name, model, 1e-3, "cpu", 3)
    assert all(g[k] == v for g in opt.param_groups for k, v in options.items())
    assert {k: v for k, v in optimizers.OPTIMIZERS.items() if k != name} == others


_NOT_SCRIPTS = ("__init__.py", "conftest.py", "common.py", "peers.py", "second_moments.py", "test_step_time.py")
_SCRIPTS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "bench").glob("*.py"))


@pytest.mark.slow  # ≈ 70 s: each script starts its own Python
@pytest.mark.parametrize("script", [name for name in _SCRIPTS if name not in _NOT_SCRIPTS])
def test_every_bench_script_has_help(script):
    """bench/README.md: every script has ``--help``, which prints its usage and runs nothing."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONPATH": str(root)}
    args = (
        ["-m", f"bench.{script[:-3]}"]
        if "from . import" in (root / "bench" / script).read_text()
        else [f"bench/{script}"]
    )
    run = subprocess.run(
        [sys.executable, *args, "--help"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "usage" in run.stdout.lower(), (
        run.returncode,
        run.stdout[-500:],
        run.stderr[-1000:],
    )


def test_main_job_variants_help_prints_its_usage(monkeypatch, capsys):
    """``--help`` (bench/README.md: every script has one) and no argument print the usage; they
    used to become OUT: ``--out --help`` reached the main job's parser (an error), or nothing
    (ValueError)."""
    from bench import main_job_variants

    monkeypatch.setattr(main_job_variants, "main", lambda argv: pytest.fail(f"the main job ran: {argv}"))
    assert main_job_variants.run(["--help"]) == 0
    assert "main_job_variants.py OUT" in capsys.readouterr().out
    assert main_job_variants.run([]) == 2
