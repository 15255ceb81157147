import os

# One BLAS thread, as in python_tests/conftest.py: the machine's cores are shared.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
