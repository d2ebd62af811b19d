"""Triton kernels for CUDA: the reference's `elect` and `continual_chunk`, each fused into one kernel.

Each program owns BLOCK consecutive elements, viewed as `(BLOCK // 8, 8)`: row j holds the 8
elements whose mask bits share byte j, so packing a mask is one row sum of shifted bits.

Sums are `tl.reduce(x, axis, tl.standard._sum_combine)`, what `tl.sum` does inside: `tl.sum` and
`tl.zeros` are themselves @triton.jit functions, made when triton is imported, and only interpret
if TRITON_INTERPRET was set before that import; the built-ins (`tl.reduce`, `tl.full`) work
whatever the order, and the interpreter runs this reduce as a numpy sum.

One pass over the tasks, in task order, does all of the election:
- the float32 election sum runs sequentially (the reference's order, so signs are bit-identical;
  `tl.sum` over a `(T, BLOCK)` tile would reorder the additions);
- the largest positive and the largest negative magnitude are both kept, and the sign picks one;
- each task's positive and negative entries are recorded as bits of two int32 registers, so the
  masks of the first 32 tasks need no second read of the deltas (later tasks are read again);
- per-task L1 sums of each block are reduced in float32 and written per program, one partial
  per program and task; the host adds the partials up in float64. This keeps every program's
  arithmetic in float32 (float64 reductions take twice the registers and shuffles, and float64
  units), and its error is bounded: the summands are nonnegative, so a tree reduction over a
  block of B elements is off by at most ceil(log2 B) float32 roundings, 10 * 2**-24 = 6e-7
  relative at B = 1024. Masks and unified values do not depend on the sums: they stay bit for bit.

The continual kernel rebuilds the stored tasks in registers, `where(M_i, u * float32(lambda_i), 0)`,
from the unified delta and the packed masks, and then runs the same pass with the new deltas
appended. Its product is compiled without FMA contraction (`enable_fp_fusion=False`): a fused
multiply-add into the election sum would skip the product's rounding and could flip a sign.

Device contract: inputs are torch tensors, on CPU or CUDA (rescalers may also be a numpy array,
the host's table). They are computed on CUDA when it is there (CPU inputs are copied over) and
the results come back on the inputs' device. Under `TRITON_INTERPRET=1` without CUDA the kernels
run on CPU tensors (that is how CI tests them). `rebuild` and `fidelity_sums` are torch
operations on the inputs' device (fusion.reference_torch), the same bits as the reference.
"""

from __future__ import annotations

import contextlib

try:
    import torch
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(f"{__name__} needs torch and triton ({error}): pip install 'condu[triton]'") from error

from .. import reference_torch
from ..dtypes import BF16, F16, F32, F64, Q4, Q8, QUANT_BLOCK, unified_form
from ..errors import InputError
from ..reference import OWN_ROW, ChunkResult, Originals

__all__ = ["KERNEL", "TritonKernel", "DEFAULT_BLOCK", "BIT_TASKS", "is_interpreted"]

DEFAULT_BLOCK = 1024  # elements per program: 8 per thread at 4 warps, 32 KiB of fp32 input per task
BIT_TASKS = 32  # tasks whose signs fit the int32 bit registers; later tasks are read twice
_BIT_TASKS = tl.constexpr(BIT_TASKS)  # the same, visible inside @triton.jit functions

# How the unified delta is rounded to the store's form (0: float32 and float64 keep float32 values;
# 3, 4: int8 and int4 blocks of QBLOCK elements, whose scales are written out too).
_ROUNDING = {F32: 0, F64: 0, F16: 1, BF16: 2, Q8: 3, Q4: 4}
_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds half to even (|x| < 2**22)
_SMALLEST_SCALE = tl.constexpr(2.0**-126)  # the smallest normal float32: smaller scales store the block as zeros


@triton.jit
def _round_to_stored(x, ROUNDING: tl.constexpr):
    """float32 -> the store's dtype -> float32, rounding to nearest even as torch's `.to()` does."""
    if ROUNDING == 1:  # float16: Triton's downcast rounds to nearest even on GPU and in the interpreter
        x = x.to(tl.float16).to(tl.float32)
    elif ROUNDING == 2:  # bfloat16 by bits: the interpreter's cast truncates, this rounds everywhere
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN
    return x


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _quantize(x, scales_ptr, pid, n, ROUNDING: tl.constexpr, BLOCK: tl.constexpr, QBLOCK: tl.constexpr):
    """x (B, 8) block-quantized and dequantized (fusion.reference.quantize_blocks), its BLOCK // QBLOCK
    block scales stored: scale = max |x| / qmax (0 below the smallest normal float32), code =
    rint(x / scale) clamped to +-qmax, x = code * scale. Divisions round to nearest (div_rn: a plain
    `/` is approximate on the GPU), rint is an exact add and subtract of 1.5 * 2**23."""
    qmax = 127.0 if ROUNDING == 3 else 7.0
    groups = tl.reshape(tl.abs(x), (BLOCK // QBLOCK, QBLOCK))  # element order kept: rows of 8 are consecutive
    amax = tl.reduce(groups, 1, _max_combine)  # (G,) out-of-range elements are zeros
    scale = tl.math.div_rn(amax, tl.full(amax.shape, qmax, tl.float32))
    scale = tl.where(scale >= _SMALLEST_SCALE, scale, 0.0)  # (G,)
    group_idx = pid * (BLOCK // QBLOCK) + tl.arange(0, BLOCK // QBLOCK)
    tl.store(scales_ptr + group_idx, scale, mask=group_idx < (n + QBLOCK - 1) // QBLOCK)
    spread = tl.reshape(tl.broadcast_to(scale[:, None], (BLOCK // QBLOCK, QBLOCK)), x.shape)  # (B, 8)
    on = spread > 0
    code = tl.math.div_rn(x, tl.where(on, spread, 1.0))
    code = (code + _MAGIC) - _MAGIC
    code = tl.minimum(tl.maximum(code, -qmax), qmax)
    return tl.where(on, code * spread, 0.0)


@triton.jit
def _task_row(t: tl.constexpr, stored, old_masks_ptr, rescalers_ptr, new_ptr, offs, in_range,
              byte_idx, byte_in_range, lanes, n, n_bytes, T_OLD: tl.constexpr):
    """Row t of the stacked deltas in float32, (B, 8): a rebuilt stored task, or a new delta."""
    if t < T_OLD:
        packed = tl.load(old_masks_ptr + tl.cast(n_bytes, tl.int64) * t + byte_idx, mask=byte_in_range, other=0)  # (B,)
        bit = (packed[:, None] >> lanes[None, :]) & 1  # (B, 8)
        rescaler = tl.load(rescalers_ptr + t)  # float32(lambda_t)
        row = tl.where(bit != 0, stored * rescaler, 0.0)
    else:
        row_start = tl.cast(n, tl.int64) * (t - T_OLD)  # int64: T * n may pass 2**31
        row = tl.load(new_ptr + row_start + offs, mask=in_range, other=0.0).to(tl.float32)
    return row


@triton.jit
def _pack_and_sum(t: tl.constexpr, mask, abs_unified, lanes, byte_idx, byte_in_range, pid, n_bytes,
                  out_masks_ptr, masked_l1_ptr, T: tl.constexpr):
    """Store task t's mask as bytes (bit b of byte j = element 8j+b) and its block sum of |M_t * u|."""
    packed = tl.reduce(mask.to(tl.int32) << lanes[None, :], 1, tl.standard._sum_combine).to(tl.uint8)  # (B,)
    tl.store(out_masks_ptr + tl.cast(n_bytes, tl.int64) * t + byte_idx, packed, mask=byte_in_range)
    masked = tl.where(mask, abs_unified, 0.0)  # (B, 8) float32
    tl.store(masked_l1_ptr + pid * T + t, tl.reduce(masked, None, tl.standard._sum_combine))  # float32 partial


@triton.jit
def _unify_block(unified_ptr, old_masks_ptr, rescalers_ptr, new_ptr,
                 out_unified_ptr, out_masks_ptr, delta_l1_ptr, masked_l1_ptr, scales_ptr, n, n_bytes,
                 T_OLD: tl.constexpr, T: tl.constexpr, ROUNDING: tl.constexpr, BLOCK: tl.constexpr,
                 QBLOCK: tl.constexpr):
    """Elect over rows 0..T-1 (T_OLD rebuilt stored tasks, then new deltas) for one block."""
    pid = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, 8)  # (8,)
    byte_idx = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)  # (B,)
    offs = byte_idx[:, None] * 8 + lanes[None, :]  # (B, 8) element indices
    in_range = offs < n
    byte_in_range = byte_idx < n_bytes
    stored = tl.full((BLOCK // 8, 8), 0, tl.float32)
    if T_OLD > 0:
        stored = tl.load(unified_ptr + offs, mask=in_range, other=0.0).to(tl.float32)

    # Phase 1: one read of every task. Sequential float32 sum, both signed maxima, sign bits, L1.
    total = tl.full((BLOCK // 8, 8), 0, tl.float32)
    largest_pos = tl.full((BLOCK // 8, 8), 0, tl.float32)
    largest_neg = tl.full((BLOCK // 8, 8), 0, tl.float32)
    pos_bits = tl.full((BLOCK // 8, 8), 0, tl.int32)
    neg_bits = tl.full((BLOCK // 8, 8), 0, tl.int32)
    for t in tl.static_range(T):
        row = _task_row(t, stored, old_masks_ptr, rescalers_ptr, new_ptr, offs, in_range,
                        byte_idx, byte_in_range, lanes, n, n_bytes, T_OLD)  # (B, 8)
        if t == 0:
            total = row  # the reference starts from row 0 itself, not from 0 + row 0
        else:
            total = total + row
        largest_pos = tl.maximum(largest_pos, tl.where(row > 0, row, 0.0))
        largest_neg = tl.maximum(largest_neg, tl.where(row < 0, -row, 0.0))
        if t < _BIT_TASKS:
            pos_bits = pos_bits | ((row > 0).to(tl.int32) << t)
            neg_bits = neg_bits | ((row < 0).to(tl.int32) << t)
        tl.store(delta_l1_ptr + pid * T + t, tl.reduce(tl.abs(row), None, tl.standard._sum_combine))  # float32 partial

    # Phase 2: the elected sign (an exact zero sum elects -1) picks magnitude and mask bits.
    positive = total > 0
    unified = tl.where(positive, 1.0, -1.0) * tl.where(positive, largest_pos, largest_neg)
    if ROUNDING >= 3:
        unified = _quantize(unified, scales_ptr, pid, n, ROUNDING, BLOCK, QBLOCK)
    else:
        unified = _round_to_stored(unified, ROUNDING)
    tl.store(out_unified_ptr + offs, unified, mask=in_range)
    agree_bits = tl.where(positive, pos_bits, neg_bits)

    # Phase 3: strict masks (a zero never agrees), packed, and the masked L1 of the stored u.
    abs_unified = tl.abs(unified)
    for t in tl.static_range(T):
        if t < _BIT_TASKS:
            mask = ((agree_bits >> t) & 1) != 0
        else:
            row = _task_row(t, stored, old_masks_ptr, rescalers_ptr, new_ptr, offs, in_range,
                            byte_idx, byte_in_range, lanes, n, n_bytes, T_OLD)
            mask = tl.where(positive, row > 0, row < 0)
        _pack_and_sum(t, mask, abs_unified, lanes, byte_idx, byte_in_range, pid, n_bytes,
                      out_masks_ptr, masked_l1_ptr, T)


@triton.jit
def _elect_kernel(deltas_ptr, out_unified_ptr, out_masks_ptr, delta_l1_ptr, masked_l1_ptr, scales_ptr, n, n_bytes,
                  T: tl.constexpr, ROUNDING: tl.constexpr, BLOCK: tl.constexpr, QBLOCK: tl.constexpr):
    """elect + mask + bit-pack + L1 partial sums over deltas (T, n)."""
    _unify_block(deltas_ptr, deltas_ptr, deltas_ptr, deltas_ptr, out_unified_ptr, out_masks_ptr,
                 delta_l1_ptr, masked_l1_ptr, scales_ptr, n, n_bytes, 0, T, ROUNDING, BLOCK, QBLOCK)


@triton.jit
def _continual_kernel(unified_ptr, old_masks_ptr, rescalers_ptr, new_ptr,
                      out_unified_ptr, out_masks_ptr, delta_l1_ptr, masked_l1_ptr, scales_ptr, n, n_bytes,
                      T_OLD: tl.constexpr, T: tl.constexpr, ROUNDING: tl.constexpr, BLOCK: tl.constexpr,
                      QBLOCK: tl.constexpr):
    """Unpack + rebuild the T_OLD stored tasks, append T - T_OLD new deltas, elect, pack, L1."""
    _unify_block(unified_ptr, old_masks_ptr, rescalers_ptr, new_ptr, out_unified_ptr, out_masks_ptr,
                 delta_l1_ptr, masked_l1_ptr, scales_ptr, n, n_bytes, T_OLD, T, ROUNDING, BLOCK, QBLOCK)


def is_interpreted() -> bool:
    """True when the kernels were created under TRITON_INTERPRET=1 (they run on CPU tensors)."""
    return not isinstance(_elect_kernel, triton.runtime.JITFunction)


def _compute_device(tensor: torch.Tensor) -> torch.device:
    """CUDA when inputs are there or it is available; CPU only for the Triton interpreter."""
    if tensor.is_cuda:
        return tensor.device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if is_interpreted():
        return torch.device("cpu")
    raise RuntimeError("fusion/kernels/triton_kernels.py: the triton kernel needs CUDA "
                       "(or TRITON_INTERPRET=1 to interpret it); use kernel='cpu' on this machine")


def _on(device: torch.device):
    """Launch on the inputs' GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _rounding_of(unified_dtype) -> int:
    """The rounding mode of a stored form (a DType or BlockQuant, its name, or a torch dtype)."""
    try:
        return _ROUNDING[unified_form(unified_dtype)]
    except ValueError as error:
        raise InputError(f"fusion/kernels/triton_kernels.py: unified_dtype {unified_dtype}: {error}") from None


def _check_floating(name: str, tensor: torch.Tensor, dims: int) -> None:
    if tensor.dim() != dims or not tensor.is_floating_point():
        raise InputError(f"fusion/kernels/triton_kernels.py: {name} must be a {dims}-D floating-point tensor, "
                         f"got shape {tuple(tensor.shape)} of {tensor.dtype}; pass the stacked chunk as floats")


def _check_deltas(deltas: torch.Tensor) -> None:
    if deltas.dim() != 2:
        raise InputError(f"elect expects stacked deltas of shape (T, n), got {tuple(deltas.shape)}")
    _check_floating("deltas", deltas, 2)
    if deltas.shape[0] == 0:
        raise InputError("fusion/kernels/triton_kernels.py: elect needs at least one task; deltas has 0 rows")


def _new_rows(new_deltas: torch.Tensor, n: int) -> torch.Tensor:
    """New deltas as `(T_new, n)`; one task may come as a flat `(n,)`."""
    rows = new_deltas.unsqueeze(0) if new_deltas.dim() == 1 else new_deltas
    if rows.dim() != 2 or rows.shape[1] != n or not rows.is_floating_point():
        raise InputError(f"fusion/kernels/triton_kernels.py: new_deltas must be floats of shape (T_new, {n}) "
                         f"to match unified, got {tuple(new_deltas.shape)} of {new_deltas.dtype}")
    return rows


def _check_stored(packed_masks: torch.Tensor, rescalers: torch.Tensor, n: int, t_new: int) -> None:
    n_bytes = -(-n // 8)
    if packed_masks.dim() != 2 or packed_masks.shape[1] != n_bytes or packed_masks.dtype != torch.uint8:
        raise InputError(f"fusion/kernels/triton_kernels.py: packed_masks must be uint8 of shape (T_old, {n_bytes}) "
                         f"for {n} elements, got {tuple(packed_masks.shape)} of {packed_masks.dtype}")
    if rescalers.numel() != packed_masks.shape[0]:
        raise InputError(f"fusion/kernels/triton_kernels.py: rescalers has {rescalers.numel()} entries but "
                         f"packed_masks has {packed_masks.shape[0]} stored tasks; pass one rescaler per task")
    if packed_masks.shape[0] + t_new == 0:
        raise InputError("fusion/kernels/triton_kernels.py: continual needs a stored or a new task; both are empty")


class TritonKernel:
    """The two ConDU chunk operations as Triton kernels, with the reference's signatures and results.

    `block` is the number of elements per program (a power of two, at least 8); `num_warps` the
    warps per program on GPU.
    """

    name = "triton"

    def __init__(self, *, block: int = DEFAULT_BLOCK, num_warps: int = 4) -> None:
        if block < 8 or block & (block - 1):
            raise InputError(f"fusion/kernels/triton_kernels.py: block must be a power of two >= 8, got {block}")
        self.block = block
        self.num_warps = num_warps

    def elect(self, deltas: torch.Tensor, *, unified_dtype=F32, base: torch.Tensor | None = None,
              originals: Originals | None = None) -> ChunkResult:
        """Unify stacked deltas `(T, n)`, as `fusion.reference.elect` (with `base` and `originals` too)."""
        _check_deltas(deltas)
        rounding, device = _rounding_of(unified_dtype), _compute_device(deltas)
        rows = _minus_base(deltas.to(device), base)  # (T, n)
        out = _Outputs.allocate(*rows.shape, self._block_for(rounding), device, quantized=rounding >= 3)
        self._launch(_elect_kernel, out, rows, T=rows.shape[0], ROUNDING=rounding)
        return _with_fidelity(out.result(deltas.device), rows, None, originals, base)

    def continual(self, unified: torch.Tensor, packed_masks: torch.Tensor, rescalers: torch.Tensor,
                  new_deltas: torch.Tensor, *, unified_dtype=F32, base: torch.Tensor | None = None,
                  originals: Originals | None = None) -> ChunkResult:
        """Rebuild the stored tasks and unify them with the new deltas, as `fusion.reference.continual_chunk`."""
        rescalers = torch.as_tensor(rescalers)  # the host's numpy table is welcome too
        _check_floating("unified", unified, 1)
        n = unified.numel()
        rows = _new_rows(new_deltas, n)  # (T_new, n)
        _check_stored(packed_masks, rescalers, n, rows.shape[0])
        rounding, device = _rounding_of(unified_dtype), _compute_device(unified)
        # float32(lambda_i), rounded once from float64 as the reference's `reconstruct` does.
        rescalers32 = rescalers.reshape(-1).to(torch.float64).to(torch.float32).to(device)  # (T_old,)
        rows = _minus_base(rows.to(device), base)  # (T_new, n)
        inputs = [x.to(device).contiguous() for x in (unified, packed_masks)] + [rescalers32, rows]
        t_old = packed_masks.shape[0]
        out = _Outputs.allocate(t_old + rows.shape[0], n, self._block_for(rounding), device, quantized=rounding >= 3)
        self._launch(_continual_kernel, out, *inputs, T_OLD=t_old, T=t_old + rows.shape[0], ROUNDING=rounding)
        return _with_fidelity(out.result(unified.device), rows, inputs[:3], originals, base)

    def rebuild(self, base: torch.Tensor, unified: torch.Tensor, packed: torch.Tensor, rescaler: float, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """theta0 + lambda * M * u over one chunk, float32 (n,) on the inputs' device (torch operations)."""
        return reference_torch.rebuild(base, unified, packed, rescaler, out=out)

    def fidelity_sums(self, unified: torch.Tensor, packed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """(5,) float64 sums A, E, D, Z, C of one chunk, on the inputs' device (torch operations)."""
        return reference_torch.fidelity_sums(unified, packed, original)

    def _block_for(self, rounding: int) -> int:
        """The block of a launch; a quantized u needs whole quantization blocks in each program."""
        if rounding >= 3 and self.block % QUANT_BLOCK:
            raise InputError(f"fusion/kernels/triton_kernels.py: block {self.block} cuts the quantization blocks "
                             f"of {QUANT_BLOCK} elements; use a block of at least {QUANT_BLOCK}")
        return self.block

    def _launch(self, kernel, out: "_Outputs", *inputs: torch.Tensor, **constants: int) -> None:
        if out.programs == 0:  # an empty chunk: nothing to launch
            return
        with _on(out.unified.device):
            # enable_fp_fusion=False: the rebuilt product is rounded before it joins the election sum.
            kernel[(out.programs,)](*inputs, out.unified, out.masks, out.delta_l1, out.masked_l1, out.scales, out.n,
                                    out.n_bytes, BLOCK=self.block, QBLOCK=QUANT_BLOCK, num_warps=self.num_warps,
                                    enable_fp_fusion=False, **constants)

    def __repr__(self) -> str:
        return f"TritonKernel(block={self.block}, num_warps={self.num_warps})"


def _minus_base(rows: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """Rows as contiguous deltas: `rows - base` in float32 (one rounding) when they are weights."""
    if base is None:
        return rows.contiguous()
    return (rows.float() - torch.as_tensor(base, device=rows.device).float().reshape(1, -1)).contiguous()


def _stacked_row(i: int, rows: torch.Tensor, stored: list | None) -> torch.Tensor:
    """Row i the kernel unified: stored task i rebuilt from (u, packed masks, float32 rescalers), or a new delta."""
    t_old = 0 if stored is None else stored[1].shape[0]
    if i >= t_old:
        return rows[i - t_old]
    unified, packed, rescalers32 = stored
    mask = reference_torch.unpack_bits(packed[i : i + 1], unified.numel())[0]  # (n,) bool
    return reference_torch.reconstruct(unified, mask, float(rescalers32[i]))  # (n,)


def _with_fidelity(result: ChunkResult, rows: torch.Tensor, stored: list | None, originals: Originals | None,
                   base: torch.Tensor | None) -> ChunkResult:
    """The result with each measured task's fidelity sums, and with `originals.drift` every task's
    sums against its own row (torch operations on the device). `stored`: the continual step's
    (unified, packed masks, float32 rescalers) on the device."""
    if originals is None:
        return result
    unified, masks = result.unified.to(rows.device), result.packed_masks.to(rows.device)
    table = torch.zeros((masks.shape[0], 5), dtype=torch.float64, device=rows.device)  # (T, 5)
    for i, r in enumerate(torch.as_tensor(originals.index).tolist()):
        if r == OWN_ROW:
            table[i] = reference_torch.fidelity_sums(unified, masks[i], _stacked_row(i, rows, stored))
        elif r >= 0:
            original = _minus_base(torch.as_tensor(originals.rows[r], device=rows.device).reshape(1, -1), base)[0]
            table[i] = reference_torch.fidelity_sums(unified, masks[i], original)
    drift = None
    if originals.drift:  # a task measured against its own row already has these sums
        own = torch.as_tensor(originals.index).tolist()
        drift = torch.stack([table[i] if own[i] == OWN_ROW else
                             reference_torch.fidelity_sums(unified, masks[i], _stacked_row(i, rows, stored))
                             for i in range(masks.shape[0])]).to(result.unified.device)  # (T, 5)
    return result._replace(fidelity=table.to(result.unified.device), drift=drift)


class _Outputs:
    """Output buffers of one launch: unified (n,), packed masks (T, n/8), per-program float32 L1 partials
    (P, T), and the block scales of a quantized u (ceil(n / QUANT_BLOCK),)."""

    def __init__(self, unified, masks, delta_l1, masked_l1, scales, quantized: bool):
        self.unified, self.masks, self.delta_l1, self.masked_l1 = unified, masks, delta_l1, masked_l1
        self.scales, self.quantized = scales, quantized
        self.n, self.n_bytes, self.programs = unified.numel(), masks.shape[1], delta_l1.shape[0]

    @classmethod
    def allocate(cls, t: int, n: int, block: int, device: torch.device, *, quantized: bool = False) -> "_Outputs":
        partial = torch.empty((-(-n // block), t), dtype=torch.float32, device=device)  # (P, T)
        masks = torch.empty((t, -(-n // 8)), dtype=torch.uint8, device=device)  # (T, n/8)
        scales = torch.empty(-(-n // QUANT_BLOCK) if quantized else 1, dtype=torch.float32, device=device)
        return cls(torch.empty(n, dtype=torch.float32, device=device), masks, partial, torch.empty_like(partial),
                   scales, quantized)

    def result(self, home: torch.device) -> ChunkResult:
        """Sum the partials in float64 and bring everything back to the inputs' device."""
        return ChunkResult(self.unified.to(home), self.masks.to(home),
                           self.delta_l1.double().sum(dim=0).to(home), self.masked_l1.double().sum(dim=0).to(home),
                           scales=self.scales.to(home) if self.quantized else None)


KERNEL = TritonKernel()
