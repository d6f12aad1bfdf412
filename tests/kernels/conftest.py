import os

GPU_TESTS = "test_gpu_kernels.py"


def pytest_configure(config):
    """Before any kernel module is imported (triton.jit decides at decoration time whether a kernel runs compiled or
    interpreted): the Triton interpreter for this suite on the CPU, except in a session of the compiled-kernel tests
    alone (`python -m pytest tests/kernels/test_gpu_kernels.py`), which need the kernels compiled for the GPU."""
    files = [os.path.basename(str(arg).split("::")[0]) for arg in config.args]
    if not (files and all(name == GPU_TESTS for name in files)):
        os.environ["TRITON_INTERPRET"] = "1"
