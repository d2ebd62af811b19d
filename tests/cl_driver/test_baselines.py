import pytest
import torch
from safetensors.torch import save_file

from cl_driver import baselines


def test_max_magnitude_keeps_the_signed_delta_of_largest_magnitude():
    deltas = torch.tensor([[1.0, -5.0, 2.0, 0.0], [-3.0, 4.0, 2.0, 0.0]])
    assert torch.equal(baselines.max_magnitude(deltas, 1.0), torch.tensor([-3.0, -5.0, 2.0, 0.0]))
    assert torch.equal(baselines.max_magnitude(deltas, 0.5), torch.tensor([-1.5, -2.5, 1.0, 0.0]))


def test_merges_read_checkpoints_and_leave_integer_buffers_alone(tmp_path):
    base = {"w": torch.zeros(2, 2), "ids": torch.arange(3)}
    paths = []
    for i, w in enumerate([torch.tensor([[1.0, -2.0], [0.0, 3.0]]), torch.tensor([[-4.0, 1.0], [2.0, 1.0]])]):
        paths.append(tmp_path / f"{i}.safetensors")
        save_file({"w": w, "ids": torch.arange(3) + 7}, str(paths[-1]))
    ta = baselines.task_arithmetic(base, paths, alpha=0.5)
    assert torch.allclose(ta["w"], torch.tensor([[-1.5, -0.5], [1.0, 2.0]]))
    mm = baselines.magmax(base, paths, scale=1.0)
    assert torch.equal(mm["w"], torch.tensor([[-4.0, -2.0], [2.0, 3.0]]))
    assert torch.equal(ta["ids"], base["ids"]) and torch.equal(mm["ids"], base["ids"])


# ---------------------------------------------------------------- continual TIES


def test_ties_merges_three_vectors_as_computed_by_hand():
    vectors = torch.tensor([[4.0, -1.0, 2.0, -3.0, 0.5],
                            [-2.0, 3.0, -1.0, 1.0, 5.0],
                            [3.0, -4.0, -3.0, 2.0, -0.5]])
    # keep 0.4 of 5: each row keeps what reaches its 3rd smallest magnitude (2, 2, 3): its top 3
    trimmed = baselines.ties_trim(vectors, 0.4)
    assert torch.equal(trimmed, torch.tensor([[4.0, 0.0, 2.0, -3.0, 0.0],
                                              [-2.0, 3.0, 0.0, 0.0, 5.0],
                                              [3.0, -4.0, -3.0, 0.0, 0.0]]))
    # summed mass 5, -1, -1, -3, 5: signs +, -, -, -, +; column 0 has two entries that agree (4, 3)
    assert torch.equal(baselines.ties_elect(trimmed), torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0]))
    assert torch.equal(baselines.ties_merge(vectors, keep=0.4, merge="sum"), torch.tensor([7.0, -4.0, -3.0, -3.0, 5.0]))
    assert torch.equal(baselines.ties_merge(vectors, keep=0.4, merge="mean"), torch.tensor([3.5, -4.0, -3.0, -3.0, 5.0]))
    assert torch.equal(baselines.ties_trim(vectors, 1.0), vectors)  # keep everything


def test_ties_election_gives_a_zero_sum_the_majority_sign():
    trimmed = torch.tensor([[1.0, 0.0, -2.0, -1.0], [-1.0, 0.0, 1.0, -1.0]])  # sums 0, 0, -1, -2
    signs = baselines.ties_elect(trimmed)
    assert torch.equal(signs, torch.tensor([-1.0, -1.0, -1.0, -1.0]))  # majority: sign(0 + 0 - 1 - 1)
    assert torch.equal(baselines.ties_disjoint(trimmed, signs, "sum"), torch.tensor([-1.0, 0.0, -2.0, -2.0]))
    assert torch.equal(baselines.ties_disjoint(trimmed, signs, "mean"), torch.tensor([-1.0, 0.0, -2.0, -1.0]))


def test_continual_ties_adds_the_scaled_merge_of_the_running_vector_and_the_new_one():
    first = baselines.continual_ties_step(None, {"a": torch.tensor([4.0, -2.0]), "b": torch.tensor([1.0])},
                                          keep=0.34, scale=0.5, merge="mean")
    assert torch.equal(first.delta["a"], torch.tensor([2.0, -1.0])) and torch.equal(first.delta["b"], torch.tensor([0.5]))
    # over the whole model, in name order: running [2, -1, 0.5], new [1, -2, -3]. keep 0.34 of 3: each
    # row keeps what reaches its 2nd smallest magnitude: [2, -1, 0] and [0, -2, -3]; signs +, -, -;
    # disjoint means 2, (-1 - 2) / 2, -3; the running vector plus half of them:
    second = baselines.continual_ties_step(first, {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([-3.0])},
                                           keep=0.34, scale=0.5, merge="mean")
    assert torch.equal(second.delta["a"], torch.tensor([3.0, -1.75])) and torch.equal(second.delta["b"], torch.tensor([-1.0]))


# ---------------------------------------------------------------- OPCM


def test_split_rank_is_where_the_singular_values_share_first_exceeds_alpha():
    assert baselines.split_rank(torch.tensor([3.0, 1.0]), 0.5) == 0  # shares 0.75, 1
    assert baselines.split_rank(torch.tensor([3.0, 1.0]), 0.8) == 1
    assert baselines.split_rank(torch.tensor([3.0, 2.0, 1.0]), 0.9) == 2  # shares 0.5, 0.83, 1
    assert baselines.split_rank(torch.zeros(3), 0.5) == 0


def test_opcm_keeps_what_is_orthogonal_to_the_previous_singular_pairs_2x2():
    previous = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)  # singular pairs (1, 1)/v2 x3, (1, -1)/v2 x1
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)  # = u1 v2^T + u2 v1^T
    for alpha in (0.5, 0.8):
        # a task made of the orthogonal part, the previous matrix and the identity (u1 v1^T + u2 v2^T)
        task = orthogonal + 5 * previous + 7 * torch.eye(2, dtype=torch.float64)
        assert torch.allclose(baselines.opcm_project(previous, task, alpha), orthogonal, atol=1e-12)
        assert torch.allclose(baselines.opcm_project(previous, orthogonal, alpha), orthogonal, atol=1e-12)
        assert torch.allclose(baselines.opcm_project(previous, previous, alpha), torch.zeros(2, 2, dtype=torch.float64),
                              atol=1e-12)


def test_opcm_protects_the_leading_block_of_singular_pairs_3x3():
    previous = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    task = torch.arange(1.0, 10.0, dtype=torch.float64).reshape(3, 3)
    # r = 2 at alpha 0.9: the pairs (i, i) and (i, j < 2) go; at 0.7 (r = 1) the diagonal alone
    assert torch.allclose(baselines.opcm_project(previous, task, 0.9),
                          torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 6.0], [7.0, 8.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(baselines.opcm_project(previous, task, 0.7),
                          torch.tensor([[0.0, 2.0, 3.0], [4.0, 0.0, 6.0], [7.0, 8.0, 0.0]], dtype=torch.float64))


def test_opcm_thin_projection_equals_fusion_bench_full_svd_form():
    generator = torch.Generator().manual_seed(0)
    for shape in ((4, 3), (3, 5)):
        previous, task = (torch.randn(*shape, generator=generator, dtype=torch.float64) for _ in range(2))
        u, s, vh = torch.linalg.svd(previous, full_matrices=True)
        r = baselines.split_rank(s, 0.5)
        coords = u.T @ task @ vh.T  # (m, n)
        coords.diagonal().fill_(0)
        coords[:r, :r] = 0
        assert torch.allclose(baselines.opcm_project(previous, task, 0.5), u @ coords @ vh, atol=1e-12)


def test_opcm_step_rescales_the_running_sum_to_the_mean_task_vector_norm():
    w1 = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    first = {"fc.weight": w1, "fc.bias": torch.tensor([0.0], dtype=torch.float64),
             "token_embedding.weight": torch.tensor([[1.0]], dtype=torch.float64)}  # ||.||^2 = 10 + 0 + 1
    state = baselines.opcm_step(None, first, alpha=0.5)
    assert state.delta is not first and state.lam == 1.0 and state.norms == (11 ** 0.5,)
    # the linear weight loses its components on w1's pairs (u1 v1^T, u2 v2^T): w1 itself goes; the
    # bias and the embedding table (not a linear weight) are added as they are
    second = {"fc.weight": w1 + torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64),
              "fc.bias": torch.tensor([2.0], dtype=torch.float64),
              "token_embedding.weight": torch.tensor([[1.0]], dtype=torch.float64)}  # ||.||^2 = 12 + 4 + 1
    state = baselines.opcm_step(state, second, alpha=0.5)
    running = {"fc.weight": torch.tensor([[3.0, 1.0], [1.0, 1.0]]), "fc.bias": torch.tensor([2.0]),
               "token_embedding.weight": torch.tensor([[2.0]])}  # S_2, ||S_2||^2 = 12 + 4 + 4
    lam = 20 ** 0.5 / ((11 ** 0.5 + 17 ** 0.5) / 2)
    assert state.lam == pytest.approx(lam) and state.norms == pytest.approx((11 ** 0.5, 17 ** 0.5))
    for name, s in running.items():
        assert torch.allclose(state.delta[name], s.double() / lam)
    assert baselines.model_norm(state.delta) == pytest.approx((11 ** 0.5 + 17 ** 0.5) / 2)


# ---------------------------------------------------------------- one task at a time, in the loop's method


class _Folder:
    def __init__(self, paths):
        self.paths = paths

    def checkpoint(self, chain, i):
        return self.paths[i]


class _Evaluation:
    """What RunningMerge reads of the loop's Evaluation; model_row builds the weights and keeps them."""

    def __init__(self, base, paths):
        self.base_state, self.folder, self.built = base, _Folder(paths), {}
        self.finetunes = type("Identity", (), {"weights": staticmethod(lambda state: state)})()

    def model_row(self, key, build):
        self.built[key] = build()
        return [0.0]


@pytest.mark.parametrize("kind", ["continual_ties", "opcm"])
def test_the_running_merge_of_the_loop_equals_the_fold_and_a_resumed_one_too(tmp_path, kind):
    from cl_driver.config import MethodConfig
    from cl_driver.methods import METHODS

    generator = torch.Generator().manual_seed(1)
    base = {"fc.weight": torch.randn(3, 4, generator=generator), "fc.bias": torch.zeros(3),
            "ids": torch.arange(3)}
    paths = []
    for t in range(3):
        paths.append(tmp_path / f"{t}.safetensors")
        save_file({"fc.weight": base["fc.weight"] + torch.randn(3, 4, generator=generator),
                   "fc.bias": torch.randn(3, generator=generator), "ids": torch.arange(3)}, str(paths[-1]))
    method = METHODS[kind](MethodConfig.model_validate(kind))
    evaluation = _Evaluation(base, paths)
    for i in range(3):
        method.row(evaluation, i)
        expected = baselines.fold(base, paths[:i + 1], method.step)
        built = evaluation.built[(*method.key, i)]
        assert all(torch.equal(built[k], expected[k]) for k in base) and torch.equal(built["ids"], base["ids"])
    resumed = METHODS[kind](MethodConfig.model_validate(kind))  # a new process: nothing in memory
    resumed.row(evaluation, 2)
    assert all(torch.equal(evaluation.built[(*method.key, 2)][k], built[k]) for k in base)
