import pytest
import torch
import torch.nn.functional as F

from cl_driver.gating import gate_selection
from cl_driver.inference import (ExpertCache, combine_all_experts, combine_routed, routed_logits, rows_selecting,
                                 top_k_experts)
from cl_driver.prototypes import class_means, combine_prototypes, routing_weights


@pytest.mark.parametrize("aggregate", ["mean", "weighted"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_routed_experts_equal_every_expert_then_selecting(aggregate, k):
    torch.manual_seed(k)
    n, t, c = 40, 5, 7
    base, all_logits = torch.randn(n, c), torch.randn(t, n, c)
    selection, values = top_k_experts(torch.randn(n, t), k)
    calls = []

    def expert_on(expert, rows):  # what an expert computes on just the rows that chose it
        calls.append((expert, len(rows)))
        return all_logits[expert][rows]

    routed = {e: expert_on(e, rows_selecting(selection, e)[0]) for e in range(t) if (selection == e).any()}
    fast = combine_routed(base, selection, values, routed, aggregate)
    reference = combine_all_experts(base, all_logits, selection, values, aggregate)
    assert torch.allclose(fast, reference, atol=1e-6)
    assert torch.equal(fast.argmax(1), reference.argmax(1))
    assert sum(rows for _, rows in calls) == n * min(k, t)  # each sample ran exactly its K experts


def test_mean_rule_is_the_plain_average_of_theta0_and_the_selected_experts():
    base = torch.tensor([[1.0, 0.0]])
    selection, values = torch.tensor([[2, 0]]), torch.tensor([[0.9, 0.1]])
    out = combine_routed(base, selection, values, {0: torch.tensor([[0.0, 3.0]]), 2: torch.tensor([[5.0, 0.0]])})
    assert torch.allclose(out, torch.tensor([[2.0, 1.0]]))
    weighted = combine_routed(base, selection, values, {0: torch.tensor([[0.0, 3.0]]), 2: torch.tensor([[5.0, 0.0]])},
                              "weighted")
    assert torch.allclose(weighted, torch.tensor([[(1 + 0.9 * 5) / 2.0, 0.1 * 3 / 2.0]]))


def test_top_k_never_asks_for_more_experts_than_there_are():
    idx, val = top_k_experts(torch.tensor([[0.1, 0.7], [0.9, 0.2]]), 4)
    assert idx.tolist() == [[1, 0], [0, 1]]
    assert val.shape == (2, 2)


def test_routing_weight_is_the_best_prototype_cosine():
    feats = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    protos = [torch.tensor([[1.0, 0.0], [0.6, 0.8]]), torch.tensor([[0.0, 1.0]])]
    assert torch.allclose(routing_weights(feats, protos), torch.tensor([[1.0, 0.0], [0.8, 1.0]]))


def test_prototypes_add_the_class_image_mean_and_the_template_mean():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    means = class_means(feats, torch.tensor([0, 0, 1]), 3)
    assert torch.allclose(means, torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]]))
    protos = combine_prototypes(means, torch.tensor([[0.5, -0.5], [0.0, 1.0], [0.0, 2.0]]))
    assert torch.allclose(protos, torch.tensor([[1.0, 0.0], [2 ** -0.5, 2 ** -0.5], [0.0, 1.0]]))


def test_expert_cache_is_least_recently_used():
    cache, built = ExpertCache(2), []

    def build(key):
        return lambda: built.append(key) or {"key": key}

    for key in ["a", "b", "a", "c", "a", "b"]:
        assert cache.get(key, build(key))["key"] == key
    assert built == ["a", "b", "c", "b"]  # "b" was evicted by "c", "a" was kept by its use
    with pytest.raises(ValueError):
        ExpertCache(0)


def routed_case(seed: int, *, experts: int = 4, classes: int = 3, dim: int = 8):
    """Two inputs of unit theta0 features, their base logits, every expert's logits on every row, and
    prototypes; expert 2's point away from every image, so it is never anyone's first choice."""
    gen = torch.Generator().manual_seed(seed)
    lean = torch.zeros(dim)
    lean[0] = 3.0
    feats = {name: F.normalize(torch.rand(n, dim, generator=gen) + lean, dim=-1) for name, n in (("a", 30), ("b", 12))}
    protos = [F.normalize(torch.rand(classes, dim, generator=gen) + lean, dim=-1) for _ in range(experts)]
    protos[2] = F.normalize(-lean.expand(classes, dim), dim=-1)
    base = {name: torch.randn(len(f), classes, generator=gen) for name, f in feats.items()}
    every = {name: torch.randn(experts, len(f), classes, generator=gen) for name, f in feats.items()}
    return feats, base, protos, every


def recording(every, calls):
    """An ExpertLogits over fixed logits that records each call's expert and rows."""
    def experts(t, rows):
        calls.append((t, {name: r.tolist() for name, r in rows.items()}))
        return {name: every[name][t][r] for name, r in rows.items()}
    return experts


@pytest.mark.parametrize("aggregate", ["mean", "weighted"])
def test_the_routed_rule_runs_each_expert_once_on_exactly_the_rows_that_chose_it(aggregate):
    feats, base, protos, every = routed_case(0)
    calls = []
    out = routed_logits(feats, base, protos, recording(every, calls), top_k=1, aggregate=aggregate, visit=[2])
    assert [t for t, _ in calls] == sorted({t for t, _ in calls}) and 2 in [t for t, _ in calls]
    assert dict(calls)[2] == {}  # visited though no image chose it: called on no rows
    ran = sorted((t, name, r) for t, rows in calls for name, rs in rows.items() for r in rs)
    chosen = sorted((t, name, r) for name, (_, route) in out.items()
                    for r, row in enumerate(route.selection.tolist()) for t in row)
    assert ran == chosen
    for name, (logits, route) in out.items():
        selection, values = top_k_experts(routing_weights(feats[name], protos), 1)
        assert torch.equal(route.selection, selection) and torch.equal(route.values, values)
        reference = combine_all_experts(base[name], every[name], selection, values, aggregate)
        assert torch.allclose(logits, reference, atol=1e-6)


def test_the_routed_rule_with_gates_never_runs_an_expert_below_its_threshold():
    feats, base, protos, every = routed_case(1)
    thresholds = torch.tensor([float("inf"), -1.0, -1.0, -1.0])  # expert 0 never passes
    calls = []
    out = routed_logits(feats, base, protos, recording(every, calls), top_k=3, aggregate="gated",
                        thresholds=thresholds)
    assert 0 not in [t for t, _ in calls] and calls
    for name, (logits, route) in out.items():
        selection, values = top_k_experts(routing_weights(feats[name], protos), 3)
        gated = gate_selection(selection, values, thresholds)
        assert torch.equal(route.selection, gated)
        assert torch.allclose(logits, combine_all_experts(base[name], every[name], gated, values, "gated"), atol=1e-6)
