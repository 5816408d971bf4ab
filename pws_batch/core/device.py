"""Which device and dtype a run uses: auto = CUDA in half precision when there is a GPU, else CPU in fp32."""

from __future__ import annotations

import torch

from pws_batch.core.params import DTYPES

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
assert set(TORCH_DTYPES) == set(DTYPES) - {"auto"}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto = fp16 on CUDA (half precision), fp32 on CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return TORCH_DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> "float16" (how run metadata names a dtype)."""
    return str(dtype).removeprefix("torch.")
