import os

# Before anything imports the kernel modules: triton.jit decides at decoration time whether a kernel runs compiled
# (CUDA) or interpreted (CPU, this test suite).
os.environ["TRITON_INTERPRET"] = "1"
