"""A change never silently destroys a stored task (fusion.store.guard).

The cases are built so the damage is known: an outlier weight placed where task 1's delta is
positive and task 2's is not (only task 1's mask holds it), a tensor mis-scaled 1000x where only
task 1 has a delta, and a removal that leaves a tiny task re-unified with a task of large
magnitudes on 4 of its 256 weights.
"""

import json

import hypothesis.strategies as st
import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings

from fusion import InputError, Store
from fusion.reference import NOT_MEASURED, Originals, continual_chunk, elect, reconstruct, unpack_bits
from fusion.store import guard
from fusion.store import manifest as manifest_module
from fusion.store.manifest import ManifestError, check_manifest
from fusion.testing.checkpoints import snapshot, write_checkpoint
from fusion.testing.strategies import checkpoint_sets, rescaler_modes
from fusion.testing.vectors import expected_delta, requires_vectors, vectors_dir

from .helpers import OPTS, manifest, models, one_line_error, run

LAYER = "layer.0.weight"


def _outlier_at(base, fts) -> tuple[int, int]:
    """A weight of LAYER where task 1's delta is > 0 and task 2's is <= 0: only task 1's mask holds it."""
    d1, d2 = (ft[LAYER] - base[LAYER] for ft in fts[:2])
    return tuple(np.argwhere((d1 > 0) & (d2 <= 0))[0])


def _outlier_store(tmp_path, value: float):
    """A store of tasks 1 and 2, and a third checkpoint: task 3's fine-tune with `value` at one weight."""
    base_path, paths, base, fts = models(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths[:2], **OPTS)
    bad = {**fts[2], LAYER: fts[2][LAYER].copy()}
    bad[LAYER][_outlier_at(base, fts)] = value
    return store, write_checkpoint(bad, tmp_path / "bad.safetensors"), base


# ---- the 3e38 weight ------------------------------------------------------------------------------


def test_a_weight_of_3e38_is_refused_through_the_api_and_changes_nothing(tmp_path):
    store, bad, _ = _outlier_store(tmp_path, 3e38)
    before = snapshot(store.path)
    with pytest.raises(InputError) as err:
        store.add(bad)
    message = str(err.value)
    assert message.startswith(f"add {bad}: tensor '{LAYER}' of task 3 (bad) has a delta of 3e+38, over 10000 x")
    assert "the store is unchanged" in message and "--allow-degrade" in message and "\n" not in message
    assert snapshot(store.path) == before


def test_a_weight_of_3e38_is_refused_through_the_cli_and_changes_nothing(tmp_path):
    store, bad, _ = _outlier_store(tmp_path, 3e38)
    before = snapshot(store.path)
    line = one_line_error(run(["add", bad, "--store", store.path, "-q"], tmp_path), f"tensor '{LAYER}' of task 3 (bad)")
    assert "3e+38" in line and "--allow-degrade" in line
    assert snapshot(store.path) == before


def test_allow_degrade_adds_it_says_so_and_the_history_and_info_keep_it(tmp_path):
    store, bad, _ = _outlier_store(tmp_path, 3e38)
    rescaler = store.task(1).rescaler
    result = run(["add", bad, "--store", store.path, "-q", "--allow-degrade"], tmp_path)
    assert result.exit_code == 0 and "added task 3 (bad)" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("condu-fuse: warning: allowed: ")]
    assert len(warnings) == 2, result.stderr  # the outlier itself, and what it did to task 1
    # What the issue reported, let through on purpose: task 1's rescaler collapses.
    assert rescaler > 0.5 and store.task(1).rescaler < 1e-30
    (event,) = manifest(store.path)["history"]
    assert event["generation"] == store.generation and event["operation"] == "add" and event["tasks"] == [1, 3]
    assert any("3e+38" in a for a in event["allowed"])
    assert any(a.startswith(f"add {bad}: would damage task 1 (task1): cosine") and "rescaler changed" in a
               and f"most of the change is in tensor '{LAYER}'" in a for a in event["allowed"])
    report = json.loads(run(["info", "--json", "--store", store.path], tmp_path).stdout)
    assert [t["degraded_by_choice"] for t in report["tasks"]] == [[store.generation], [], [store.generation]]
    assert report["history"] == manifest(store.path)["history"]
    text = run(["info", "--store", store.path], tmp_path).stdout
    assert text.count(f"degraded by choice at gen {store.generation}") == 2


def test_a_store_written_before_the_history_loads_with_none(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths[:2], **OPTS)
    content = manifest(store.path)
    del content["history"]
    content["checksum"] = manifest_module._checksum(content)  # as an older condu wrote it
    (store.path / "condu.json").write_text(json.dumps(content))
    assert Store.open(store.path).manifest().history == []
    Store.open(store.path).add(paths[2])
    assert manifest(store.path)["history"] == []


def test_later_changes_keep_the_history(tmp_path):
    store, bad, _ = _outlier_store(tmp_path, 3e38)
    store.add(bad, allow_degrade=True)
    history = manifest(store.path)["history"]
    store.attach(1, "prototypes", {"p": np.ones(2, np.float32)})
    assert manifest(store.path)["history"] == history


# ---- damage the magnitude check lets pass -----------------------------------------------------------


def test_a_rescaler_collapse_is_refused_naming_the_task_and_the_tensor(tmp_path):
    base_path, paths, base, fts = models(tmp_path, 3)
    rms = float(np.sqrt(np.mean(base[LAYER].astype(np.float64) ** 2)))
    bound, _ = guard.delta_bound(rms)
    store, bad, _ = _outlier_store(tmp_path / "b", bound / 2)  # under the magnitude bound
    before = snapshot(store.path)
    with pytest.raises(InputError) as err:
        store.add(bad)
    message = str(err.value)
    assert message.startswith(f"add {bad}: would damage task 1 (task1): ")
    assert "its rescaler changed" in message and f"most of the change is in tensor '{LAYER}'" in message
    assert snapshot(store.path) == before


def _mis_scaled(tmp_path):
    """Base: 'big' (4096) and 'small' (4). Task 1 changes both, task 2 only 'big'; the new checkpoint
    is task 1's fine-tune with its 'small' delta 1000x: under the magnitude bound, yet it pulls
    task 1's rebuild onto 4 weights of 4100."""
    rng = np.random.default_rng(0)
    base = {"big": rng.normal(size=4096).astype(np.float32), "small": rng.normal(size=4).astype(np.float32)}
    d1 = {"big": 0.01 * rng.normal(size=4096), "small": np.full(4, 0.01)}
    d2 = {"big": 0.01 * rng.normal(size=4096), "small": np.zeros(4)}
    d3 = {**d1, "small": 1000 * d1["small"]}
    paths = [write_checkpoint({k: (base[k] + d[k]).astype(np.float32) for k in base}, tmp_path / f"{n}.safetensors")
             for n, d in (("one", d1), ("two", d2), ("scaled", d3))]
    return write_checkpoint(base, tmp_path / "base.safetensors"), paths


def test_a_rebuild_pulled_onto_a_few_weights_is_refused_on_its_cosine(tmp_path):
    base, (one, two, scaled) = _mis_scaled(tmp_path)
    store = Store.unify(tmp_path / "s", base, [one, two], **OPTS)
    before = snapshot(store.path)
    with pytest.raises(InputError) as err:
        store.add(scaled)
    message = str(err.value)
    assert message.startswith(f"add {scaled}: would damage task 1 (one): cosine ")
    assert "rescaler changed" not in message  # the cosine alone refuses it
    assert "most of the change is in tensor 'small'" in message
    assert snapshot(store.path) == before
    store.add(scaled, allow_degrade=True)
    (drift_one, drift_two) = store.last_pass["drift"]
    assert drift_one["cosine"] < guard.MIN_COSINE < 0.9 < drift_two["cosine"]


# ---- remove ----------------------------------------------------------------------------------------


def _remove_case(tmp_path):
    """Base zeros; a: +1 on all 256 weights of 'w' and on 'v'; x: +0.001 on 'w'; z: +1 on 4 weights of 'w'.
    x is rebuilt exactly next to a; without a, x is re-unified against z's magnitudes on those 4."""
    zeros = {"w": np.zeros(256, np.float32), "v": np.zeros(8, np.float32)}
    z = np.zeros(256, np.float32)
    z[:4] = 1
    tasks = {"a": {"w": np.ones(256), "v": np.ones(8)}, "x": {"w": np.full(256, 1e-3), "v": np.zeros(8)},
             "z": {"w": z, "v": np.zeros(8)}}
    base = write_checkpoint(zeros, tmp_path / "base.safetensors")
    paths = [write_checkpoint({k: v.astype(np.float32) for k, v in t.items()}, tmp_path / f"{name}.safetensors")
             for name, t in tasks.items()]
    return Store.unify(tmp_path / "s", base, paths, **OPTS)


def test_a_removal_that_damages_another_task_is_refused(tmp_path):
    store = _remove_case(tmp_path)
    before = snapshot(store.path)
    with pytest.raises(InputError) as err:
        store.remove("a")
    message = str(err.value)
    assert message.startswith("remove task 1 (a): would damage task 2 (x): cosine ")
    assert "most of the change is in tensor 'w'" in message and "keep it, or pass --allow-degrade" in message
    assert snapshot(store.path) == before
    one_line_error(run(["remove", "--task", "a", "--store", store.path, "-q"], tmp_path), "would damage task 2 (x)")
    assert snapshot(store.path) == before


def test_allow_degrade_removes_it_and_records_a_removal(tmp_path):
    store = _remove_case(tmp_path)
    result = run(["remove", "--task", "a", "--store", store.path, "-q", "--allow-degrade"], tmp_path)
    assert result.exit_code == 0 and "removed task 1 (a)" in result.stdout and "allowed: remove task 1" in result.stderr
    (event,) = manifest(store.path)["history"]
    assert (event["operation"], event["tasks"], event["generation"]) == ("remove", [2], store.generation)


# ---- ordinary changes are never refused, and the statistics are what they say ---------------------------


def _rebuilt(state_unified, packed, rescalers, names, task: int) -> np.ndarray:
    """Task `task`'s rebuilt delta over every tensor, float64 (n,): lambda * M * u, readable numpy."""
    parts = []
    for k, name in enumerate(names):
        u = state_unified[name].reshape(-1)
        mask = unpack_bits(packed[name][task : task + 1], u.size)[0]
        parts.append(reconstruct(u, mask, rescalers[task][k]).astype(np.float64))
    return np.concatenate(parts)


def _stored_rebuilds(store) -> list[np.ndarray]:
    state = store.fused()
    return [_rebuilt(state.unified, state.masks, state.rescalers, state.names, i) for i in range(state.num_tasks)]


def _cosine_and_ratio(new: np.ndarray, old: np.ndarray) -> tuple[float, float]:
    nn, no = np.linalg.norm(new), np.linalg.norm(old)
    return (float(new @ old / (nn * no)) if nn * no else float(nn == no)), float(nn / no)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.filter_too_much])
@given(sets=checkpoint_sets(num_tasks=st.integers(2, 4), num_tensors=st.integers(2, 3), max_numel=64, private=False),
       mode=rescaler_modes())
def test_ordinary_random_stores_are_never_refused_and_the_guard_measures_cosine_and_l2_ratio(tmp_path_factory, sets,
                                                                                              mode):
    """Fine-tunes of one scale (fusion.testing.strategies.checkpoint_sets), at least 48 fused weights:
    every add and a remove go through, and each stored task's cosine and L2 ratio are those of its new
    rebuild against its previous one, computed in numpy from the stored state."""
    base, fts = sets
    assume(sum(a.size for a in base.values() if a.dtype.kind == "f") >= 48)
    tmp = tmp_path_factory.mktemp("random")
    base_path = write_checkpoint(base, tmp / "base.safetensors")
    paths = [write_checkpoint(ft, tmp / f"t{i}.safetensors") for i, ft in enumerate(fts)]
    store = Store.unify(tmp / "s", base_path, paths[:1], rescaler=mode, **OPTS)
    for path in paths[1:]:
        before = _stored_rebuilds(store)
        store.add(path, name=path.stem)  # never refused
        after = _stored_rebuilds(store)
        for drift, old, new in zip(store.last_pass["drift"], before, after):
            cosine, ratio = _cosine_and_ratio(new, old)
            assert drift["cosine"] == pytest.approx(cosine, rel=1e-6, abs=1e-9)
            assert drift["l2_ratio"] == pytest.approx(ratio, rel=1e-6)
            assert drift["cosine"] > guard.MIN_COSINE
    store.remove(1)  # never refused either
    assert manifest(store.path)["history"] == []


@requires_vectors()
@pytest.mark.parametrize("mode", ["model", "tensor-mean", "tensor"])
def test_the_conformance_vectors_continual_step_goes_through_and_its_drift_is_the_vectors(tmp_path, mode):
    """The guard's statistics of the add4 step equal numpy's cosine and L2 ratio of the vectors' own
    expected rebuilds (computed independently of this project), before and after."""
    vectors = vectors_dir()
    store = Store.unify(tmp_path / "s", vectors / "base.safetensors",
                        [vectors / f"task{i}.safetensors" for i in (1, 2, 3)], rescaler=mode, **OPTS)
    store.add(vectors / "task4.safetensors")
    for i, drift in enumerate(store.last_pass["drift"], start=1):
        old, new = (expected_delta(mode, step, i) for step in ("oneshot123", "add4"))
        flat = [np.concatenate([d[k].reshape(-1).astype(np.float64) for k in sorted(d)]) for d in (new, old)]
        cosine, ratio = _cosine_and_ratio(*flat)
        assert drift["cosine"] == pytest.approx(cosine, rel=1e-5)
        assert drift["l2_ratio"] == pytest.approx(ratio, rel=1e-5)
        assert drift["cosine"] > 0.8 and 0.5 < ratio < 2  # far from the bounds


# ---- the pieces ------------------------------------------------------------------------------------------


@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 3), st.integers(1, 40))
def test_drift_sums_give_the_readable_cosine_and_l2_ratio(seed, t_old, t_new, n):
    """guard.drift_of on the reference's drift sums equals cosine and L2 ratio of the stored tasks'
    rebuilds before (lambda M u) and after a continual step, in numpy."""
    rng = np.random.default_rng(seed)
    old_rows = (rng.integers(-8, 9, (t_old, n)) / 64).astype(np.float32)
    stored = elect(old_rows)
    rescalers = rng.uniform(0.1, 3.0, t_old)
    new = (rng.integers(-8, 9, (t_new, n)) / 64).astype(np.float32)
    measure = Originals(np.zeros((0, n), np.float32), np.full(t_old + t_new, NOT_MEASURED), drift=True)
    result = continual_chunk(stored.unified, stored.packed_masks, rescalers, new, originals=measure)
    new_rescalers = rng.uniform(0.1, 3.0, t_old)  # any rescalers: the sums do not depend on them
    masks = unpack_bits(result.packed_masks, n)
    for i in range(t_old):
        before = reconstruct(stored.unified, unpack_bits(stored.packed_masks[i : i + 1], n)[0], rescalers[i])
        after = reconstruct(result.unified, masks[i], new_rescalers[i])
        cosine, ratio, error2 = guard.drift_of(result.drift[i][None], np.array([new_rescalers[i]]))
        b, a = before.astype(np.float64), after.astype(np.float64)
        if np.linalg.norm(b) == 0:
            assert ratio is None
            continue
        # The sums multiply u by float32(lambda) in float64; a rebuild rounds that product to float32.
        expected_cosine, expected_ratio = _cosine_and_ratio(a, b)
        assert cosine == pytest.approx(expected_cosine, rel=1e-6, abs=1e-9)
        assert ratio == pytest.approx(expected_ratio, rel=1e-6)
        assert error2.sum() == pytest.approx(((a - b) ** 2).sum(), rel=1e-6, abs=1e-6 * (b @ b))


def test_rescaler_change_weighs_tensors_by_the_task_they_hold():
    old, new = np.array([1.0, 1.0]), np.array([4.0, 0.25])
    assert guard.rescaler_change(old, new, np.array([1.0, 1.0])) == pytest.approx(1.0)
    assert guard.rescaler_change(old, new, np.array([3.0, 1.0])) == pytest.approx(4 ** 0.5)
    assert guard.rescaler_change(old, np.array([0.0, 2.0]), np.array([1.0, 1.0])) == pytest.approx(2.0)
    assert guard.rescaler_change(np.array([0.0]), np.array([1.0]), np.array([1.0])) is None


def test_the_bound_of_a_zero_base_tensor_is_absolute_and_says_so():
    assert guard.delta_bound(0.0) == (guard.ABSOLUTE_DELTA_BOUND, True)
    assert guard.delta_bound(1.0) == (guard.MAX_DELTA_OVER_RMS, False)


def test_a_zero_base_tensor_refuses_a_delta_over_the_absolute_bound_and_says_so(tmp_path):
    base = write_checkpoint({"w": np.zeros(16, np.float32), "b": np.ones(16, np.float32)}, tmp_path / "base.safetensors")
    ok = write_checkpoint({"w": np.full(16, 0.5, np.float32), "b": np.ones(16, np.float32)}, tmp_path / "ok.safetensors")
    far = write_checkpoint({"w": np.full(16, 500, np.float32), "b": np.ones(16, np.float32)}, tmp_path / "far.safetensors")
    with pytest.raises(InputError, match=r"tensor 'w' of task 2 \(far\) has a delta of 500, over the absolute bound 100 "
                                         r"\(its base tensor has RMS 0"):
        Store.unify(tmp_path / "s", base, [ok, far], **OPTS)
    assert not (tmp_path / "s").exists()


def test_the_manifest_refuses_a_history_event_of_a_later_generation(tmp_path):
    store, bad, _ = _outlier_store(tmp_path, 3e38)
    store.add(bad, allow_degrade=True)
    m = store.manifest()
    later = msgspec.structs.replace(m.history[0], generation=m.generation + 1)
    with pytest.raises(ManifestError, match="history event"):
        check_manifest(msgspec.structs.replace(m, history=[later]), "condu.json")
