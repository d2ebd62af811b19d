"""No silent surprises: a task rebuilt farther from its fine-tune than the base is says so, and the
same content is not stored twice unless it is named.

The degraded task is built exactly: task a moves every weight by +10, task b by +0.01 on half of
them and by -1 on the other half. The unified sign is +, so b keeps only its +0.01 half, scaled
up to carry its whole L1 norm: rebuilt 1.01 where it was 0.01, and 0 where it was -1, which is
sqrt(2) times as far from b's delta as the base is.
"""

import dataclasses
import shutil

import numpy as np
import pytest

from fusion import Store
from fusion.store.records import DEGRADED_REL_L2
from fusion.testing.checkpoints import snapshot, tiny_base, tiny_finetune, write_checkpoint

from .helpers import OPTS

SHAPE = (8, 8)


def far_apart(tmp_path):
    """base (zeros), a (+10 everywhere), b (+0.01 / -1 alternating) and c (3 / 2), as .safetensors files."""
    even = np.arange(64).reshape(SHAPE) % 2 == 0
    tensors = {"base": np.zeros(SHAPE, np.float32), "a": np.full(SHAPE, 10, np.float32),
               "b": np.where(even, 0.01, -1.0).astype(np.float32), "c": np.where(even, 3.0, 2.0).astype(np.float32)}
    return {name: write_checkpoint({"w": t}, tmp_path / f"{name}.safetensors") for name, t in tensors.items()}


# ---- degraded tasks ---------------------------------------------------------------------------


def test_a_task_farther_from_its_fine_tune_than_the_base_is_degraded(tmp_path):
    paths = far_apart(tmp_path)
    store = Store.unify(tmp_path / "s", paths["base"], [paths["a"], paths["b"]], **OPTS)
    a, b = store.tasks
    assert b.fidelity["rel_l2"] == pytest.approx(np.sqrt(2), rel=1e-3) and b.degraded
    assert a.fidelity["rel_l2"] < DEGRADED_REL_L2 and not a.degraded
    assert [t["degraded"] for t in store.info()["tasks"]] == [False, True]  # info --json carries it


@pytest.mark.parametrize("rel_l2, degraded", [(None, False), (0.999, False), (1.0, True), (1.141, True)])
def test_degraded_is_rel_l2_at_least_one(tmp_path, rel_l2, degraded):
    base, paths, _ = _tiny(tmp_path, 1)
    record = Store.unify(tmp_path / "s", base, paths, **OPTS).task(1)
    assert dataclasses.replace(record, fidelity={**record.fidelity, "rel_l2": rel_l2}).degraded is degraded


# ---- the same content twice -------------------------------------------------------------------


def _tiny(tmp_path, count):
    base = tiny_base()
    base_path = write_checkpoint(base, tmp_path / "base.safetensors")
    paths = [write_checkpoint(tiny_finetune(base, seed=i), tmp_path / f"ft{i}.safetensors") for i in range(count)]
    return base_path, paths, base


def test_adding_stored_content_again_is_refused_and_changes_nothing(tmp_path):
    base, (ft0, ft1), _ = _tiny(tmp_path, 2)
    store = Store.unify(tmp_path / "s", base, [ft0, ft1], **OPTS)
    copy = shutil.copy(ft1, tmp_path / "elsewhere.safetensors")  # the content counts, not the path
    before = snapshot(store.path)
    for again in (ft0, copy):
        with pytest.raises(ValueError) as err:
            store.add(again)
        twin = "task 1 (ft0)" if again == ft0 else "task 2 (ft1)"
        assert str(err.value) == f"{again}: the same content as {twin}; pass --name to keep a second copy"
        assert snapshot(store.path) == before
    record = store.add(copy, name="ft1-again")  # named: a second copy on purpose
    assert (record.number, record.name) == (3, "ft1-again")


def test_the_same_fused_weights_with_another_head_are_not_the_same(tmp_path):
    base, (ft0,), tensors = _tiny(tmp_path, 1)
    ft = tiny_finetune(tensors, seed=0)
    heads = [write_checkpoint({**ft, "classifier.weight": np.full((3, 8), k, np.float32)},
                              tmp_path / f"head{k}.safetensors") for k in (1, 2)]
    store = Store.unify(tmp_path / "s", base, heads[:2], **OPTS)  # the same fused bytes, heads differ
    assert [t.private for t in store.tasks] == [("classifier.weight",), ("classifier.weight",)]
    shutil.copy(heads[0], tmp_path / "head1-copy.safetensors")
    with pytest.raises(ValueError, match=r"the same content as task 1 \(head1\)"):
        store.add(tmp_path / "head1-copy.safetensors")
    assert store.add(ft0).number == 3  # no head: not the same as either


def test_unify_refuses_two_identical_inputs_unless_named(tmp_path):
    base, (ft0, ft1), _ = _tiny(tmp_path, 2)
    copy = shutil.copy(ft0, tmp_path / "copy.safetensors")
    with pytest.raises(ValueError) as err:
        Store.unify(tmp_path / "s", base, [ft0, ft1, copy], **OPTS)
    assert str(err.value) == f"{copy}: the same content as task 1 (ft0); give each checkpoint a --name to keep both"
    assert not (tmp_path / "s").exists()
    store = Store.unify(tmp_path / "s", base, [ft0, copy], names=["one", "two"], **OPTS)
    assert [t.name for t in store.tasks] == ["one", "two"]
