#!/usr/bin/env bash
# A/B of the fused passes: this tree against scratch_gpu/base (ddf708f), alternating processes.
cd "$(dirname "$0")/.."
for round in 1 2; do
  for tree in scratch_gpu/base .; do
    (cd $tree && PYTHONPATH=. python3 - "$(pwd)" "$round" <<'PY' >> "$OUT/ab_passes.jsonl" 2>> "$OUT/ab_passes.err")
import json, sys
tree, rnd = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, tree + "/bench")
import torch
import adapprox_kernels
from bench_step import bench_passes
assert adapprox_kernels.__file__.startswith(__import__("os").path.abspath(tree)), adapprox_kernels.__file__
out = {}
for b, m, n in [(24, 4096, 1024), (1, 50257, 768)]:
    out[f"{b}x{m}x{n}"] = bench_passes(b, m, n, 8, torch.float32, torch.device("cuda"))
print(json.dumps({"tree": tree, "round": rnd, "results": out}))
PY
  done
done
