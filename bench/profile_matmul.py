"""One large product of ours and one of cuBLAS, for ncu to profile (M=8192, N=K=4096, bf16).

    ncu --kernel-name regex:'linear|gemm|sm90' --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section Occupancy python bench/profile_matmul.py
"""

import torch

from local_backend.kernels import matmul

x = torch.randn(8192, 4096, device="cuda").bfloat16()
w = torch.randn(4096, 4096, device="cuda").bfloat16()
for _ in range(2):  # warm-up launches (skipped by --launch-skip)
    matmul.linear(x, w)
    torch.mm(x, w.t())
matmul.linear(x, w)
torch.mm(x, w.t())
torch.cuda.synchronize()
