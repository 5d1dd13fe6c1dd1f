"""Loads the `cpr._C` extension, which registers the access-tracking ops as `torch.ops.cpr.*`."""
import torch

import cpr._C  # noqa: F401  (importing runs the op registrations)

ops = torch.ops.cpr


def has_cuda_kernels() -> bool:
    """Whether `cpr._C` was built with its CUDA kernels (only where torch itself has CUDA)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("cpr::count_accesses", "CUDA")
