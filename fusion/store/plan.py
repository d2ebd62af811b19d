"""What a change fuses: the tensor table from the base, and what each new checkpoint contributes.

Every floating-point tensor of the base is fused. A checkpoint's tensor is
- fused, when the base has it in the same shape;
- private (kept whole with the task), when the base lacks it or has it in another shape (a
  new head, a resized vocabulary); the base's namesake then counts as unchanged;
- missing, when the checkpoint lacks a fused tensor: an error, or with `missing="zero"`
  unchanged (a zero delta).
Everything is checked here, before any file is written, so a refusal changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..constants import MISSING_MODES
from ..dtypes import DTYPES, QUANT_FORMS, BlockQuant, DType
from ..errors import InputError
from ..fuse import private_names
from ..io import Checkpoint
from ..io.files import model_side_files
from . import layout
from .manifest import HubRef, TensorEntry
from .sources import CheckpointDeltas, DeltaSource

__all__ = ["FusedTensor", "NewTask", "plan_tensors", "plan_task", "check_missing", "side_files"]


@dataclass(frozen=True)
class FusedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: DType  # the base's
    unified_dtype: DType | BlockQuant  # how its unified delta is stored: a float dtype, or int8 / int4 blocks

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def mask_bytes(self) -> int:
        return -(-self.numel // 8)

    @property
    def quantized(self) -> bool:
        return isinstance(self.unified_dtype, BlockQuant)

    @property
    def unified_layout(self) -> tuple[DType, tuple[int, ...]]:
        """How the unified file holds it: its dtype and shape, or a block-quantized one's records as
        uint8 bytes (fusion.dtypes.BlockQuant)."""
        if isinstance(self.unified_dtype, BlockQuant):
            return DTYPES["U8"], (self.unified_dtype.nbytes(self.numel),)
        return self.unified_dtype, self.shape

    def entry(self) -> TensorEntry:
        return TensorEntry(name=self.name, shape=list(self.shape), dtype=self.dtype.code,
                           unified_dtype=self.unified_dtype.code)

    @classmethod
    def of(cls, entry: TensorEntry) -> "FusedTensor":
        form = QUANT_FORMS.get(entry.unified_dtype) or DTYPES[entry.unified_dtype]
        return cls(entry.name, tuple(entry.shape), DTYPES[entry.dtype], form)


def plan_tensors(base: Checkpoint, unified_dtype: DType | BlockQuant | None) -> list[FusedTensor]:
    """Every floating-point base tensor, in the order of its bytes in the base's files."""
    file_order = {id(f): k for k, f in enumerate(base.files.values())}
    names = sorted((n for n in base.keys() if base.info(n).dtype.is_float),
                   key=lambda n: (file_order[id(base.file_of(n))], base.info(n).begin))
    if not names:
        raise InputError(f"{base.path}: the base has no floating-point tensors to fuse")
    return [FusedTensor(n, base.info(n).shape, base.info(n).dtype, unified_dtype or base.info(n).dtype) for n in names]


def check_missing(missing: str) -> str:
    if missing not in MISSING_MODES:
        raise InputError(f"unknown missing policy {missing!r}; use one of {', '.join(MISSING_MODES)}")
    return missing


@dataclass
class NewTask:
    """A checkpoint to add: what it contributes and what it keeps aside."""

    checkpoint: Checkpoint
    name: str
    number: int
    source: str  # where it was read: an absolute path (for a hub id, its snapshot folder)
    deltas: DeltaSource  # how the pass reads its delta
    private: list[str] = field(default_factory=list)
    zero: set[str] = field(default_factory=set)  # fused tensors with a zero delta (missing, reshaped, not adapted)
    zero_filled: list[str] = field(default_factory=list)  # of those, the ones the checkpoint lacks
    side_files: list[Path] = field(default_factory=list)
    kind: str = "model"  # or "adapter" (a PEFT LoRA adapter, fused as factors or as scaling * B @ A)
    hub: HubRef | None = None  # the hub id it was resolved from
    dtype: str | dict[str, str] | None = None  # its fused tensors' own dtype (own_dtype), decouple's default

    def where(self, name: str) -> str:
        """The file that holds fused tensor `name`'s delta, for error messages."""
        return self.checkpoint.file_of(name).where if name in self.checkpoint else str(self.checkpoint.path)


def side_files(checkpoint: Checkpoint) -> list[Path]:
    """A folder checkpoint's small files (config.json, tokenizer files) whose names the store can keep."""
    if not checkpoint.is_folder:
        return []
    return [p for p in model_side_files(checkpoint.path) if _safe(p.name)]


def _safe(name: str) -> bool:
    try:
        layout.check_token(name, "a file name")
    except ValueError:
        return False
    return True


def plan_task(ckpt: Checkpoint, base: Checkpoint, fused: list[FusedTensor], *, name: str, number: int,
              missing: str, source: str) -> NewTask:
    """Sort a checkpoint's tensors into fused, private and missing; refuse what cannot be fused."""
    task = NewTask(ckpt, layout.check_task_name(name), number, source, CheckpointDeltas(ckpt), side_files=side_files(ckpt))
    shapes = {n: ckpt.info(n).shape for n in ckpt.keys()}
    task.private = private_names(shapes, {n: base.info(n).shape for n in base.keys()})
    for t in fused:
        if t.name not in ckpt:
            if missing != "zero":
                raise InputError(f"{ckpt.path}: tensor {t.name!r} of the base is missing; re-save the checkpoint "
                                 "with it, or pass --missing zero to count it as unchanged")
            task.zero.add(t.name)
            task.zero_filled.append(t.name)
        elif t.name in task.private:
            task.zero.add(t.name)
        elif not ckpt.info(t.name).dtype.is_float:
            raise InputError(f"{ckpt.file_of(t.name).where}: tensor {t.name!r} is {ckpt.info(t.name).dtype.name} but "
                             "float in the base; the checkpoint does not fine-tune this base")
    if len(task.zero) == len(fused):
        raise InputError(f"{ckpt.path}: shares no fused tensor with the base (none has the base's name and shape); "
                         "it does not fine-tune this base: check --base")
    task.dtype = own_dtype({t.name: ckpt.info(t.name).dtype for t in fused if t.name not in task.zero})
    return task


def own_dtype(dtypes: dict[str, DType]) -> str | dict[str, str] | None:
    """How a task records its fused tensors' dtypes: one code when they agree, else one per tensor."""
    codes = {name: dtype.code for name, dtype in dtypes.items()}
    distinct = set(codes.values())
    return (distinct.pop() if len(distinct) == 1 else codes) if codes else None
