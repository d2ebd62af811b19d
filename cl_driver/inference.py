"""Inference: one model per task (task identity), or theta0 plus the top-K routed experts.

Routed rule (REFERENCE.md): rank the seen tasks by w_i(x) = max_c cos(f0(x), P_ic); the
logits of x are the average of theta0's logits and its top-K experts' logits (`mean`, the
official rule), or a weighted average with weight 1 for theta0 and w_i(x) (clamped at 0) for
expert i (`weighted`). `gated` is `mean` on a selection from which `cl_driver.gating` removed
the experts below a calibrated similarity. An expert runs only on the samples that selected it;
`combine_all_experts` is the reference that runs every expert on every sample and then selects.

`routed_logits` is the whole rule, from theta0's features and logits to the combined logits; the
evaluation calls it, and so does anything else that predicts with a continual model, so both
route the same way.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Iterable, Mapping, NamedTuple, Sequence

import torch

from .config import AGGREGATES
from .gating import gate_selection
from .models import Clip, clip_logits, load_weights, text_classifier
from .prototypes import dataset_features, routing_weights

StateDict = dict[str, torch.Tensor]


class ExpertCache:
    """An LRU cache of full state dicts: an expert is rebuilt once, not once per batch."""

    def __init__(self, size: int = 4):
        if size < 1:
            raise ValueError(f"expert cache size must be >= 1, got {size}")
        self.size, self.entries, self.builds = size, OrderedDict(), 0

    def get(self, key: Hashable, build: Callable[[], StateDict]) -> StateDict:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        state = build()
        self.builds += 1
        self.entries[key] = state
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return state

    def clear(self) -> None:
        self.entries.clear()


# ---------------------------------------------------------------- routing math


def top_k_experts(weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) weights -> (N, K') expert indices and their weights, K' = min(k, T), best first."""
    values, indices = weights.topk(min(k, weights.shape[1]), dim=1)
    return indices, values


def rows_selecting(selection: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the (N, K) selection that chose `expert`, and the slot each chose it in."""
    return (selection == expert).nonzero(as_tuple=True)  # an expert fills at most one slot per row


def slot_weights(values: torch.Tensor, aggregate: str) -> torch.Tensor:
    """(N, K) similarities -> (N, K) aggregation weights of the experts (theta0 weighs 1)."""
    if aggregate in ("mean", "gated"):  # gated: the gate already took experts out of the selection
        return torch.ones_like(values)
    if aggregate == "weighted":
        return values.clamp(min=0)
    raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")


def combine_routed(base_logits: torch.Tensor, selection: torch.Tensor, values: torch.Tensor,
                   expert_logits: Mapping[int, torch.Tensor], aggregate: str = "mean") -> torch.Tensor:
    """Average theta0's (N, C) logits with each row's selected experts.

    `expert_logits[t]` holds expert t's logits on `rows_selecting(selection, t)` only (n_t, C).
    """
    weights = slot_weights(values, aggregate)  # (N, K)
    total, norm = base_logits.clone(), torch.ones(base_logits.shape[0])  # (N, C), (N,)
    for expert in sorted(expert_logits):
        rows, slots = rows_selecting(selection, expert)
        w = weights[rows, slots]  # (n_t,)
        total[rows] += w[:, None] * expert_logits[expert]
        norm[rows] += w
    return total / norm[:, None]


def combine_all_experts(base_logits: torch.Tensor, all_logits: torch.Tensor, selection: torch.Tensor,
                        values: torch.Tensor, aggregate: str = "mean") -> torch.Tensor:
    """Reference: every expert's (T, N, C) logits on every row, then the selected ones averaged."""
    num_experts = all_logits.shape[0]
    weights = slot_weights(values, aggregate)  # (N, K)
    total, norm = base_logits.clone(), torch.ones(base_logits.shape[0])
    for expert in range(num_experts):
        chosen = (selection == expert)  # (N, K)
        w = (weights * chosen).sum(dim=1)  # (N,)
        used = chosen.any(dim=1)
        total[used] += w[used, None] * all_logits[expert][used]
        norm[used] += w[used]
    return total / norm[:, None]


# ---------------------------------------------------------------- the routed rule

# Expert t's logits on some rows of each input: (t, {input: (n,) rows}) -> {input: (n, C) logits}.
# Called once per expert, so an expert's weights are built and loaded once for all inputs.
ExpertLogits = Callable[[int, Mapping[Hashable, torch.Tensor]], Mapping[Hashable, torch.Tensor]]


class Route(NamedTuple):
    selection: torch.Tensor  # (N, K) expert numbers (0-based), best first; -1 where a gate took one out
    values: torch.Tensor  # (N, K) their similarities w_t(x)


def route(feats0: torch.Tensor, prototypes: Sequence[torch.Tensor], top_k: int,
          thresholds: torch.Tensor | None = None) -> Route:
    """Each image's top-K experts by w_t(x), from its (N, D) theta0 features and the learned tasks'
    (C_t, D) prototypes; with the gated aggregate's (T,) thresholds, those below theirs are out."""
    selection, values = top_k_experts(routing_weights(feats0, prototypes), top_k)
    if thresholds is not None:
        selection = gate_selection(selection, values, thresholds)
    return Route(selection, values)


def experts_on_routes(routes: Mapping[Hashable, Route], experts: ExpertLogits, *,
                      visit: Iterable[int] = ()) -> dict[Hashable, dict[int, torch.Tensor]]:
    """{input: {t: expert t's logits on the rows of that input that selected it}}, each expert called
    once, in order; the experts in `visit` are called even where no row selected them."""
    wanted: dict[int, dict[Hashable, torch.Tensor]] = {t: {} for t in visit}
    for key, (selection, _) in routes.items():
        for t in selection.unique().tolist():
            if t >= 0:
                wanted.setdefault(t, {})[key] = rows_selecting(selection, t)[0]
    logits: dict[Hashable, dict[int, torch.Tensor]] = {key: {} for key in routes}
    for t in sorted(wanted):
        for key, values in experts(t, wanted[t]).items():
            logits[key][t] = values
    return logits


def routed_logits(feats0: Mapping[Hashable, torch.Tensor], base_logits: Mapping[Hashable, torch.Tensor],
                  prototypes: Sequence[torch.Tensor], experts: ExpertLogits, *, top_k: int, aggregate: str,
                  thresholds: torch.Tensor | None = None,
                  visit: Iterable[int] = ()) -> dict[Hashable, tuple[torch.Tensor, Route]]:
    """The routed rule on one or more inputs (sets of images): per input, its (N, C) combined logits
    and its route. `feats0` and `base_logits` are theta0's (N, D) features and (N, C) logits of each
    input; `experts` gives an expert's logits on chosen rows; `visit`: see experts_on_routes."""
    routes = {key: route(feats, prototypes, top_k, thresholds) for key, feats in feats0.items()}
    logits = experts_on_routes(routes, experts, visit=visit)
    return {key: (combine_routed(base_logits[key], *routes[key], logits[key], aggregate), routes[key])
            for key in routes}


# ---------------------------------------------------------------- running models


class ModelRunner:
    """One working CLIP whose weights are swapped between theta0, experts and merged models."""

    def __init__(self, clip: Clip, theta0: StateDict, *, cache_size: int = 4, batch_size: int = 128,
                 num_workers: int = 0, progress: bool = False):
        self.clip, self.theta0 = clip, theta0
        self.cache = ExpertCache(cache_size)
        self.batch_size, self.num_workers, self.progress = batch_size, num_workers, progress
        self.active: Hashable | None = None
        self.loads = 0

    def activate(self, key: Hashable, build: Callable[[], StateDict] | None = None) -> None:
        """Put the weights named `key` in the model (theta0 for key 'theta0')."""
        if key == self.active:
            return
        state = self.theta0 if key == "theta0" else self.cache.get(key, build)
        load_weights(self.clip.model, state)
        self.active, self.loads = key, self.loads + 1

    def invalidate(self) -> None:
        """Forget the active weights (after training changed the model in place)."""
        self.active = None

    @torch.no_grad()
    def logits(self, dataset, class_names, templates, rows: torch.Tensor | None = None,
               desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The active model's (n, C) logits and (n, D) features on `dataset` (or its `rows`)."""
        if rows is not None:
            dataset = torch.utils.data.Subset(dataset, rows.tolist())
        classifier = text_classifier(self.clip, class_names, templates)  # (C, D)
        feats, _ = dataset_features(self.clip, dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                    desc=desc if self.progress else None)
        return clip_logits(self.clip.model, feats.to(self.clip.device), classifier).cpu(), feats


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(dim=1) == labels).double().mean().item()
