"""Builds the `cpr._C` extension; the package metadata and dependencies are in pyproject.toml.

Install with `pip install --no-build-isolation -e .`: build isolation would fetch a CUDA torch of several
GB instead of compiling against the torch already in the environment.
"""
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = Path(__file__).parent
CSRC = HERE / "cpr" / "csrc"


def _extension():
    cpp = sorted(str(p.relative_to(HERE)) for p in CSRC.glob("*.cpp"))
    cuda = sorted(str(p.relative_to(HERE)) for p in CSRC.glob("*.cu"))
    # .cu kernels are compiled only where torch itself was built with CUDA; CPU kernels always.
    with_cuda = torch.version.cuda is not None and bool(cuda)
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if with_cuda:
        return CUDAExtension(
            "cpr._C",
            cpp + cuda,
            define_macros=[("CPR_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("cpr._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
