"""The ConDU state built the way the official code builds it: the in-memory peer of the store.

What a user has today, and what `python -m benchmarks.fusion_store` measures the store against:
- whole state dicts in memory (`safetensors.torch.load_file` of every checkpoint);
- task vectors as whole tensors, summed over tasks, elected tensor by tensor (EMR-Merging's
  `emr_merge` loop, which ConDU reuses);
- masks as bool tensors, one byte per parameter;
- rescalers from per-tensor means (the official rule, `tensor-mean` in `fusion.rescale`);
- the state saved with `torch.save` (pickle): `unified.pt` and one `task_<i>.pt` per task.

The rules are the project's (REFERENCE.md): sign of the sequential sum, an exact zero sum
elects -1, strict masks, the largest agreeing magnitude. So the unified delta equals the
store's bit for bit, and the benchmark checks that before it compares anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

StateDict = dict[str, torch.Tensor]

__all__ = ["load_state_dict", "task_vectors", "state_dict_sum", "emr_merge", "reconstruct",
           "save_state", "load_state", "unify", "add", "layout_bytes"]


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Every tensor of a checkpoint, loaded at once."""
    return load_file(str(path))


def task_vectors(base: StateDict, finetuned: StateDict) -> StateDict:
    """theta_i - theta0 over the float tensors; integer buffers are not fused."""
    return {k: finetuned[k] - v for k, v in base.items() if v.is_floating_point()}


def state_dict_sum(vectors: Sequence[StateDict]) -> StateDict:
    """Elementwise sum in task order (Python's `sum`, as the official helper does)."""
    return {k: sum(v[k] for v in vectors) for k in vectors[0]}


def emr_merge(vectors: Sequence[StateDict]) -> tuple[StateDict, list[StateDict], torch.Tensor]:
    """Elect, mask, rescale over whole tensors: (unified, bool masks per task, rescalers (T,))."""
    total = state_dict_sum(vectors)
    unified: StateDict = {}
    masks: list[StateDict] = [{} for _ in vectors]
    scales = torch.zeros(len(vectors))
    for key in total:
        flag = (total[key] > 0) * 2 - 1  # elected sign; an exact zero sum gives -1
        param_max = torch.zeros_like(vectors[0][key])
        for i, vector in enumerate(vectors):
            param = vector[key]
            mask = (param * flag) > 0  # strict agreement with the elected sign
            masks[i][key] = mask
            param_abs = torch.abs(mask * param)
            param_max = torch.where(param_abs > param_max, param_abs, param_max)
            scales[i] += torch.mean(torch.abs(param))
        unified[key] = param_max * flag
    return unified, masks, scales / _masked_scales(unified, masks)


def _masked_scales(unified: StateDict, masks: Sequence[StateDict]) -> torch.Tensor:
    """Sum over tensors of mean |M_i * u|, per task: the rescalers' denominators."""
    scales = torch.zeros(len(masks))
    for i, mask in enumerate(masks):
        for key, u in unified.items():
            scales[i] += torch.mean(torch.abs(u * mask[key]))
    return scales


def reconstruct(unified: StateDict, mask: StateDict, rescaler: torch.Tensor) -> StateDict:
    """Decouple one task's delta: u * M * lambda, tensor by tensor."""
    return {k: u * mask[k] * rescaler for k, u in unified.items()}


def _save_synced(obj, path: Path) -> Path:
    """torch.save, then fsync: the timing covers the data reaching the disk, as the store's does."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def save_state(out_dir: str | os.PathLike, unified: StateDict, masks: Sequence[StateDict],
               rescalers: torch.Tensor) -> list[Path]:
    """Pickle the state: `unified.pt` and `task_<i>.pt` (bool masks and the rescaler), i from 1."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_save_synced(unified, out / "unified.pt")]
    for i, mask in enumerate(masks, start=1):
        paths.append(_save_synced({"masks": mask, "rescaler": rescalers[i - 1]}, out / f"task_{i}.pt"))
    return paths


def load_state(state_dir: str | os.PathLike) -> tuple[StateDict, list[StateDict], torch.Tensor]:
    """Unpickle a saved state: (unified, masks per task, rescalers (T,))."""
    state = Path(state_dir)
    unified = torch.load(state / "unified.pt")
    tasks = sorted(state.glob("task_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    records = [torch.load(p) for p in tasks]
    return unified, [r["masks"] for r in records], torch.stack([r["rescaler"] for r in records])


def unify(base_path: str | os.PathLike, checkpoint_paths: Sequence[str | os.PathLike],
          out_dir: str | os.PathLike) -> torch.Tensor:
    """One-shot unify of fine-tuned checkpoints; returns the rescalers."""
    base = load_state_dict(base_path)
    vectors = [task_vectors(base, load_state_dict(p)) for p in checkpoint_paths]
    unified, masks, rescalers = emr_merge(vectors)
    save_state(out_dir, unified, masks, rescalers)
    return rescalers


def add(base_path: str | os.PathLike, state_dir: str | os.PathLike, checkpoint_path: str | os.PathLike,
        out_dir: str | os.PathLike) -> torch.Tensor:
    """The ConDU step: decouple every stored task, unify them with the new one, save."""
    unified, masks, rescalers = load_state(state_dir)
    vectors = [reconstruct(unified, m, r) for m, r in zip(masks, rescalers)]
    del unified, masks  # the official loop keeps only the rebuilt deltas
    base = load_state_dict(base_path)
    vectors.append(task_vectors(base, load_state_dict(checkpoint_path)))
    unified, masks, rescalers = emr_merge(vectors)
    save_state(out_dir, unified, masks, rescalers)
    return rescalers


def layout_bytes(state_dir: str | os.PathLike) -> int:
    """Bytes on disk of a saved state (every file in the folder)."""
    return sum(p.stat().st_size for p in Path(state_dir).iterdir() if p.is_file())


def main(argv=None) -> int:
    """`python -m benchmarks.official_baseline unify BASE OUT CKPT...` or `... add BASE STATE CKPT OUT`:
    the peer as a command, so that it is timed as a fresh process, start-up included, as condu-fuse is."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["unify"] and len(args) >= 4:
        unify(args[1], args[3:], args[2])
    elif args[:1] == ["add"] and len(args) == 5:
        add(args[1], args[2], args[3], args[4])
    else:
        print(main.__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
