import os

import torch

# Without CUDA, the project's Triton kernels run under Triton's interpreter, which must be switched on
# before Triton is first imported (tests_quant/kernel_env.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
