"""The elementwise rules of `fusion.reference`, in torch, for tensors on a device (the CUDA path).

The Triton kernel's `rebuild` and `fidelity_sums` and the in-memory API on CUDA tensors use
these; they follow the numpy reference operation for operation, so they give the same bits
(each product and sum is one IEEE rounding on any device; no step is fused into an FMA), and
they are tested equal to it. Imported only when the caller's tensors are torch tensors.
"""

from __future__ import annotations

try:
    import torch
except ImportError as error:  # only callers holding torch tensors get here
    raise ImportError(f"{__name__} needs torch ({error}): pip install 'condu[torch]'") from error

__all__ = ["unpack_bits", "reconstruct", "rebuild", "fidelity_sums"]


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 `(T, ceil(n/8))` -> bool `(T, n)`: element 8j+b is bit b of byte j."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)  # (8,)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (T, n/8, 8)
    return bits.reshape(packed.shape[0], packed.shape[1] * 8)[:, :n].bool()  # (T, n)


def reconstruct(unified: torch.Tensor, mask: torch.Tensor, rescaler: float) -> torch.Tensor:
    """Decouple one task: `where(M, u * float32(lambda), 0)`, float32 (n,)."""
    scale = torch.tensor(float(rescaler), dtype=torch.float32, device=unified.device)  # float32(lambda)
    return torch.where(mask, unified.float() * scale, 0.0)  # (n,)


def rebuild(base: torch.Tensor, unified: torch.Tensor, packed: torch.Tensor, rescaler: float, *,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """theta0 (n,) + lambda * M * u (n,), M from packed bits (ceil(n/8),): float32 (n,), in `out` if given."""
    mask = unpack_bits(packed.reshape(1, -1), unified.numel())[0]  # (n,) bool
    delta = reconstruct(unified.reshape(-1), mask, rescaler)  # computed before `out` (it may be u) is written
    return torch.add(base.reshape(-1).float(), delta, out=out)


def fidelity_sums(unified: torch.Tensor, packed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """(5,) float64 sums A, E, D, Z, C of one chunk (fusion.fidelity), on the inputs' device."""
    mask = unpack_bits(packed.reshape(1, -1), unified.numel())[0]  # (n,) bool
    u, o = unified.reshape(-1).float().double(), original.reshape(-1).float().double()  # (n,)
    um, om = u[mask], o[mask]
    return torch.stack([(um * um).sum(), (um * (um - om)).sum(), ((um - om) ** 2).sum(),
                        (o[~mask] ** 2).sum(), (o * o).sum()])  # (5,)
