"""The fused CPU kernel of the grouped attention (``csrc/grouped_attention.cpp``).

It is compiled on first use with torch's C++ extension builder (about 10 s, then cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), for the instruction set
torch itself runs with here. That and torch's version are part of the build's name (the
builder's cache key covers only the sources and flags): a cache shared by machines of different
CPUs holds one build for each, and a torch upgrade builds anew instead of loading a binary
compiled against other headers. Where no build is possible (no C++ compiler), a warning
says so once and the batched-matmul path in ``kernels.py`` runs instead; so it does with
``DALLE_DS_NATIVE_ATTENTION=0``.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("csrc") / "grouped_attention.cpp"
# Vector flags for the instruction set torch dispatches to on this CPU.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def ops():
    """The kernel's ops namespace, or None where the kernel is switched off or cannot be built."""
    if os.environ.get("DALLE_DS_NATIVE_ATTENTION", "1") == "0":
        return None
    from torch.utils import cpp_extension

    isa = torch.backends.cpu.get_cpu_capability()
    tag = re.sub(r"\W", "_", f"{isa}_torch_{torch.__version__}").lower()
    try:
        cpp_extension.load(
            name=f"dalle_ds_grouped_attention_{tag}", sources=[str(_SOURCE)],
            is_python_module=False,
            # -fopenmp: ATen's parallel_for is header code that runs serially without it
            extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS.get(isa, [])], extra_ldflags=["-fopenmp"])
    except Exception as error:  # a missing compiler shows up as several exception types
        warnings.warn(f"the fused CPU attention kernel could not be built ({error}); sparse attention on CPU "
                      f"runs the slower batched-matmul path. The build needs a C++ compiler (g++) and a torch "
                      f"whose ATen has cpublas::brgemm for float (tested with 2.13); set "
                      f"DALLE_DS_NATIVE_ATTENTION=0 to silence this.", stacklevel=2)
        return None
    return torch.ops.dalle_ds_attention


def usable(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether the fused kernel computes this call: CPU, fp32 or bf16, a non-empty head dim, no
    dropout (the kernel has none), and the kernel built."""
    return (q.device.type == "cpu" and q.dtype in DTYPES and q.shape[-1] > 0 and dropout_p == 0.0
            and ops() is not None)
