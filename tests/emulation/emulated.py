"""The CUDA kernels run under the CPU emulation, on torch CPU tensors.

Loads the library that scripts/emulate_cuda.sh builds from tests/emulation/*.cpp (each function
calls one launcher of a csrc/**/*_kernels.cuh header) and allocates outputs as the CUDA glue in
csrc/**/*_cuda.cu does, filled with 0xFF bytes so that an element a kernel forgets to write shows
up in a bitwise comparison.
"""

import ctypes
import os

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ERROR_BYTES = 4096
_P, _I64, _I32, _F32, _F64 = (
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_int,
    ctypes.c_float,
    ctypes.c_double,
)
_ERR = [ctypes.c_char_p, ctypes.c_size_t]
_HYPER = [_F64, _F64, _F64, _F64, _F64, _I64, _F64]
_SIGNATURES = {
    "emu_nf4_quantize": [_I32, _P, _I64, _I64, _P, _P],
    "emu_nf4_dequantize": [_I32, _P, _P, _I64, _I64, _P],
    "emu_blockwise8_quantize": [_I32, _I32, _P, _I64, _I64, _P, _P, _P],
    "emu_blockwise8_dequantize": [_I32, _I32, _P, _P, _P, _I64, _I64, _P],
    "emu_nf4_gemv": [_I32, _P, _P, _P, _P, _P, _F32, _I64, _I64, _I64, _P, _I32, _P, _P],
    "emu_adamw_step": [_I32, _P, _P, _P, _P, _I64, *_HYPER],
    "emu_adamw8bit_step": [_I32, _P, _P, _P, _P, _P, _P, _I64, _P, _P, *_HYPER],
    "emu_lora_merge": [_I32, _P, _P, _P, _I64, _I64, _I64, _F32],
    "emu_fused_ce_rows": [_I32, _P, _I64, _I64, _P, _P, _F32, _F32, _I32, _P],
    "emu_check_kernel": [ctypes.c_char_p, _I32, _I32, _P, _P],
}
# SMs of an H100 SXM: the blockwise 8-bit launchers size their grid-stride grids from it.
SM_COUNT = 132


class KernelError(RuntimeError):
    """The emulator stopped a launch: a bad launch shape, a divergent or impossible barrier, or a
    shuffle with a wrong mask."""


def default_library() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    build = os.environ.get("LORAKIT_EMULATION_BUILD", os.path.join(root, "build", "emulation"))
    return os.path.join(build, "liblorakit_emulated.so")


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    assert t.device.type == "cpu" and t.is_contiguous()
    return t.data_ptr()


def poisoned(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """An output tensor whose bytes are all 0xFF (NaN for the float types)."""
    n = 1
    for s in shape:
        n *= s
    raw = torch.full((n * dtype.itemsize,), 0xFF, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


class Emulated:
    def __init__(self, path: str | None = None) -> None:
        self.lib = ctypes.CDLL(path or default_library())
        for name, args in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes = [*args, *_ERR]
            fn.restype = ctypes.c_int
        for name, in_type in [
            ("emu_float2half", _P),
            ("emu_half2float", _P),
            ("emu_float2bfloat16", _P),
            ("emu_bfloat162float", _P),
        ]:
            getattr(self.lib, name).argtypes = [in_type, _P, _I64]

    def _call(self, name: str, *args: object) -> None:
        error = ctypes.create_string_buffer(_ERROR_BYTES)
        if getattr(self.lib, name)(*args, error, _ERROR_BYTES):
            raise KernelError(error.value.decode())

    # ---- the project's kernels ------------------------------------------------------------

    def nf4_quantize(self, w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = w.numel()
        packed = poisoned(((n + 1) // 2,), torch.uint8)
        absmax = poisoned(((n + blocksize - 1) // blocksize,), torch.float32)
        self._call("emu_nf4_quantize", DTYPE_CODES[w.dtype], _ptr(w), n, blocksize,
                   _ptr(packed), _ptr(absmax))  # fmt: skip
        return packed, absmax

    def nf4_dequantize(
        self, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, n: int, dtype: torch.dtype
    ) -> torch.Tensor:
        out = poisoned((n,), dtype)
        self._call("emu_nf4_dequantize", DTYPE_CODES[dtype], _ptr(packed), _ptr(absmax), n,
                   blocksize, _ptr(out))  # fmt: skip
        return out

    def blockwise8_quantize(
        self, x: torch.Tensor, code: torch.Tensor, blocksize: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.numel()
        q = poisoned((n,), torch.uint8)
        absmax = poisoned(((n + blocksize - 1) // blocksize,), torch.float32)
        self._call("emu_blockwise8_quantize", DTYPE_CODES[x.dtype], SM_COUNT, _ptr(x), n,
                   blocksize, _ptr(code), _ptr(q), _ptr(absmax))  # fmt: skip
        return q, absmax

    def blockwise8_dequantize(
        self,
        q: torch.Tensor,
        absmax: torch.Tensor,
        code: torch.Tensor,
        blocksize: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        out = poisoned((q.numel(),), dtype)
        self._call("emu_blockwise8_dequantize", DTYPE_CODES[dtype], SM_COUNT, _ptr(q),
                   _ptr(absmax), _ptr(code), q.numel(), blocksize, _ptr(out))  # fmt: skip
        return out

    def nf4_gemv(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        scales: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor, float],
        blocksize: int,
        out_features: int,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """y = x W^T (+ bias) for x of shape (m, in); scales: float32 absmax, or the
        double-quantized (q, nested_absmax, nested_code, offset)."""
        m, n_in = x.shape
        y = poisoned((m, out_features), x.dtype)
        if isinstance(scales, torch.Tensor):
            absmax, q, nested_absmax, code, offset = scales, None, None, None, 0.0
        else:
            absmax, (q, nested_absmax, code, offset) = None, scales
        self._call("emu_nf4_gemv", DTYPE_CODES[x.dtype], _ptr(packed), _ptr(absmax), _ptr(q),
                   _ptr(nested_absmax), _ptr(code), offset, blocksize, n_in, out_features,
                   _ptr(x), m, _ptr(bias), _ptr(y))  # fmt: skip
        return y

    def adamw_step_(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        hyper: tuple[float, float, float, float, float, int, float],
    ) -> None:
        self._call("emu_adamw_step", DTYPE_CODES[param.dtype], _ptr(param), _ptr(grad),
                   _ptr(exp_avg), _ptr(exp_avg_sq), param.numel(), *hyper)  # fmt: skip

    def adamw8bit_step_(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: list[torch.Tensor],
        code_m: torch.Tensor,
        code_v: torch.Tensor,
        hyper: tuple[float, float, float, float, float, int, float],
    ) -> None:
        qm, absmax_m, qv, absmax_v = (_ptr(t) for t in state)
        self._call("emu_adamw8bit_step", DTYPE_CODES[param.dtype], _ptr(param), _ptr(grad), qm,
                   absmax_m, qv, absmax_v, param.numel(), _ptr(code_m), _ptr(code_v),
                   *hyper)  # fmt: skip

    def lora_merge_(
        self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
    ) -> None:
        out, n_in = weight.shape
        a32, b32 = a.float().contiguous(), b.float().contiguous()  # as the CUDA glue converts them
        self._call("emu_lora_merge", DTYPE_CODES[weight.dtype], _ptr(weight), _ptr(a32),
                   _ptr(b32), out, n_in, a.shape[0], scale)  # fmt: skip

    def fused_ce_rows(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        row_scale: torch.Tensor | None,
        scale: float,
        softcap: float,
        write_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The row kernel of fused_ce_cuda.cu on a copy of ``logits`` (rows, vocab): the
        log-probs of ``labels`` (rows,) and the logits' buffer afterwards (the gradient, scaled by
        ``scale * row_scale``, when ``write_grad``)."""
        rows, vocab = logits.shape
        out, labels = logits.contiguous().clone(), labels.contiguous()
        logprobs = poisoned((rows,), torch.float32)
        self._call("emu_fused_ce_rows", DTYPE_CODES[logits.dtype], _ptr(out), rows, vocab,
                   _ptr(labels), _ptr(row_scale), scale, softcap, int(write_grad),
                   _ptr(logprobs))  # fmt: skip
        return logprobs, out

    # ---- the emulator's own checks -----------------------------------------------------------

    def check_kernel(self, name: str, blocks: int, threads: int, x: torch.Tensor) -> torch.Tensor:
        y = torch.zeros_like(x)
        self._call("emu_check_kernel", name.encode(), blocks, threads, _ptr(x), _ptr(y))
        return y

    def convert(self, name: str, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=out_dtype)
        getattr(self.lib, name)(_ptr(x), _ptr(out), x.numel())
        return out
