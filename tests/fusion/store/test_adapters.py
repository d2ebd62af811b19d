"""PEFT LoRA adapters in the store, built with peft on a tiny GPT-2: factor space and dense.

Factor space: the base is the adapters' shared initialisation, the store fuses the factor deltas
and decouples adapter folders that PeftModel loads. Dense: the base is the model, an adapter
counts as PEFT's merge delta transpose(B @ A) * scaling, and decouples full model folders.
Both are checked against the in-memory rules (`fusion.unify` / `fusion.add`) applied to deltas
computed independently: factor differences in numpy, dense deltas by PEFT in torch.
"""

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import GPT2Model

import fusion
from fusion import Store
from fusion.dtypes import F32
from fusion.io import open_checkpoint
from fusion.store.adapters import dense_adapter_deltas
from fusion.store.plan import FusedTensor
from fusion.testing.checkpoints import snapshot

from . import lora_models as lm
from .helpers import OPTS, assert_matches_state, cli_process, one_line_error, run

@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2, the shared initial adapter and three task adapters from it (factor space),
    three adapters of other ranks, patterns and scalings (dense), and a full fine-tune."""
    root = tmp_path_factory.mktemp("gpt2")
    base = lm.tiny_gpt2(root / "base")
    made = {"root": root, "base": base, "init": lm.adapter(base, root / "init", init_seed=0)}
    for k in (1, 2, 3):
        made[f"f{k}"] = lm.adapter(base, root / f"f{k}", init_seed=0, task_seed=k)
    made["d1"] = lm.adapter(base, root / "d1", init_seed=11, task_seed=1)
    made["d2"] = lm.adapter(base, root / "d2", init_seed=12, task_seed=2, r=2, lora_alpha=4,
                            rank_pattern={"h.1.mlp.c_fc": 4}, alpha_pattern={"c_fc": 16})
    made["d3"] = lm.adapter(base, root / "d3", init_seed=13, task_seed=3, lora_alpha=4, use_rslora=True)
    made["full"] = _full_finetune(base, root / "full")
    return made


def _full_finetune(base: Path, folder: Path) -> Path:
    rng = np.random.default_rng(5)
    tensors = {n: (t + rng.integers(-4, 5, t.shape) * 2.0**-7).astype(t.dtype) if t.dtype.kind == "f" else t
               for n, t in lm.model_weights(base).items()}
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base / "config.json", folder / "config.json")
    return folder


def _factor_delta(task: Path, init: Path) -> dict[str, np.ndarray]:
    start = lm.factors(init)
    return {n: t - start[n] for n, t in lm.factors(task).items()}


def _dense_delta(checkpoint: Path, base: Path) -> dict[str, np.ndarray]:
    """Over every float tensor of the base: PEFT's merge delta for an adapter (zero off its
    targets), or the fine-tune minus the base."""
    weights = {n: t for n, t in lm.model_weights(base).items() if t.dtype.kind == "f"}
    if (checkpoint / "adapter_config.json").exists():
        lora = lm.torch_dense_delta(checkpoint, base)
        return {n: lora.get(n, np.zeros_like(t)) for n, t in weights.items()}
    tuned = lm.model_weights(checkpoint)
    return {n: tuned[n] - t for n, t in weights.items()}


# ---- factor space ---------------------------------------------------------------------------


def test_factor_space_round_trip_through_the_cli(gpt2, tmp_path):
    init, (f1, f2, f3) = gpt2["init"], (gpt2[f"f{k}"] for k in (1, 2, 3))
    result = run(["unify", "--base", init, "--store", "s", "-q", "--kernel", "reference", "--chunk", "16", f1, f2],
                 tmp_path)
    assert result.exit_code == 0 and "(factors): 1 (f1), 2 (f2)" in result.output, result.output
    assert run(["add", "--store", "s", f3, "-q"], tmp_path).exit_code == 0
    store = Store.open(tmp_path / "s")

    deltas = [_factor_delta(f, init) for f in (f1, f2, f3)]
    state = fusion.add(fusion.unify(deltas[:2], kernel="reference"), deltas[2], kernel="reference")
    assert_matches_state(store, state)

    assert run(["decouple", "--store", "s", "--task", "f2", "-o", "out2", "-q"], tmp_path).exit_code == 0
    out = tmp_path / "out2"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_config.json").read_bytes() == (f2 / "adapter_config.json").read_bytes()
    rebuilt, start = lm.factors(out), lm.factors(init)
    assert rebuilt.keys() == start.keys()
    expected = state.decouple(2)  # f2
    for name, value in rebuilt.items():
        np.testing.assert_allclose(value, start[name] + expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert all(np.array_equal(rebuilt[n], v) for n, v in store.load_task("f2").items())

    info = run(["info", "--store", "s"], tmp_path).output
    assert "factor space: the base is a LoRA adapter" in info and "vs 3 separate adapters" in info
    report = json.loads(run(["info", "--store", "s", "--json"], tmp_path).output)
    assert report["space"] == "factors" and {t["kind"] for t in report["tasks"]} == {"adapter"}
    assert run(["verify", "--store", "s"], tmp_path).exit_code == 0


def test_decoupled_adapters_load_in_peft_and_give_the_outputs_their_factors_say(gpt2, tmp_path):
    from peft import PeftModel

    base, init = gpt2["base"], gpt2["init"]
    store = Store.unify(tmp_path / "s", init, [gpt2["f1"], gpt2["f2"]], **OPTS)
    folder = store.decouple("f1", tmp_path / "f1-out")
    rebuilt = {k: torch.from_numpy(v) for k, v in lm.factors(folder).items()}

    loaded = PeftModel.from_pretrained(GPT2Model.from_pretrained(str(base)), str(folder)).eval()
    state = {k.replace(".default", ""): v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert state.keys() == rebuilt.keys() and all(torch.equal(state[k], rebuilt[k]) for k in state)

    # The rebuilt factors merged by hand: W + transpose(B @ A) * alpha / r, every target stored (in, out).
    merged = GPT2Model.from_pretrained(str(base)).eval()
    weights, scaling = merged.state_dict(), 8 / 4
    with torch.no_grad():
        for key, a in rebuilt.items():
            if key.endswith(("lora_A.weight", "lora_embedding_A")):
                module = key[len(lm.PREFIX):].rsplit(".lora_", 1)[0]
                b = rebuilt[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
                weights[f"{module}.weight"] += (b @ a).T * scaling
    merged.load_state_dict(weights)
    ids = torch.arange(12).reshape(2, 6) % 64
    torch.testing.assert_close(lm.outputs(loaded, ids), lm.outputs(merged, ids), rtol=1e-4, atol=1e-4)
    peft_merged = loaded.merge_and_unload().state_dict()  # the products are exact: the merges agree bit for bit
    assert all(torch.equal(peft_merged[name], value) for name, value in merged.state_dict().items())


@pytest.mark.parametrize("config, field", [
    (dict(r=8), "r"),
    (dict(lora_alpha=16), "lora_alpha"),
    (dict(target_modules=["c_attn"]), "target_modules"),
    (dict(use_rslora=True), "use_rslora"),
    (dict(rank_pattern={"h.0.attn.c_attn": 2}), "rank_pattern"),
])
def test_a_mismatched_adapter_is_refused_and_the_store_is_unchanged(gpt2, tmp_path, config, field):
    odd = lm.adapter(gpt2["base"], tmp_path / "odd", init_seed=0, task_seed=4, **config)
    Store.unify(tmp_path / "s", gpt2["init"], [gpt2["f1"]], **OPTS)
    before = snapshot(tmp_path / "s")
    line = one_line_error(run(["add", "--store", "s", odd, "-q"], tmp_path), f"adapter_config.json: {field} is")
    assert "the base adapter's is" in line
    assert snapshot(tmp_path / "s") == before
    one_line_error(run(["unify", "--base", gpt2["init"], "--store", "new", odd, "-q"], tmp_path), field)
    assert not (tmp_path / "new").exists()


def test_a_factor_space_store_takes_adapters_only(gpt2, tmp_path):
    Store.unify(tmp_path / "s", gpt2["init"], [gpt2["f1"]], **OPTS)
    before = snapshot(tmp_path / "s")
    one_line_error(run(["add", "--store", "s", gpt2["full"], "-q"], tmp_path), "not a PEFT adapter folder")
    assert snapshot(tmp_path / "s") == before


# ---- dense ----------------------------------------------------------------------------------


def test_dense_round_trip_mixing_adapters_and_a_full_finetune(gpt2, tmp_path):
    base, d1, d2, d3, full = (gpt2[k] for k in ("base", "d1", "d2", "d3", "full"))
    result = run(["unify", "--base", base, "--store", "s", "-q", "--kernel", "reference", "--chunk", "40", d1, full, d2],
                 tmp_path)
    assert result.exit_code == 0 and "(dense)" in result.output, result.output
    store = Store.open(tmp_path / "s")
    deltas = [_dense_delta(c, base) for c in (d1, full, d2, d3)]
    state = fusion.unify(deltas[:3], kernel="reference")
    assert_matches_state(store, state)
    assert run(["add", "--store", "s", d3, "-q"], tmp_path).exit_code == 0
    state = fusion.add(state, deltas[3], kernel="reference")
    assert_matches_state(store, state)

    assert run(["decouple", "--store", "s", "--task", "d2", "-o", "d2-model", "-q"], tmp_path).exit_code == 0
    out = tmp_path / "d2-model"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["n_embd"] == 16
    expected = fusion.apply_delta(lm.model_weights(base), state.decouple(3))  # d2
    loaded = GPT2Model.from_pretrained(str(out)).state_dict()
    for name, value in lm.model_weights(out).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
        if name in loaded:
            assert np.array_equal(loaded[name].numpy(), value), name

    tasks = {t["name"]: t for t in json.loads(run(["info", "--store", "s", "--json"], tmp_path).output)["tasks"]}
    assert {n: t["kind"] for n, t in tasks.items()} == {"d1": "adapter", "full": "model", "d2": "adapter",
                                                        "d3": "adapter"}
    assert all(t["fidelity"]["generation"] == 1 for t in tasks.values())  # the kept sources were read again
    info = run(["info", "--store", "s"], tmp_path).output
    assert "dense: the base is a model" in info and "vs 4 separate checkpoints" in info


def test_the_dense_source_reads_peft_merge_delta_with_patterns_and_rslora(gpt2):
    """Whole tensors read through AdapterDeltas in uneven chunks equal PEFT's get_delta_weight."""
    base = gpt2["base"]
    with open_checkpoint(base) as model:
        fused = [FusedTensor(n, model.info(n).shape, F32, F32) for n in model.keys() if model.info(n).dtype.is_float]
    for key in ("d1", "d2", "d3"):
        reference = lm.torch_dense_delta(gpt2[key], base)
        with open_checkpoint(gpt2[key]) as adapter:
            deltas, zero = dense_adapter_deltas(adapter, fused)
            assert zero == {t.name for t in fused} - set(reference)
            for name, expected in reference.items():
                flat, numel = np.empty(expected.size, np.float32), expected.size
                for lo in range(0, numel, 24):  # 24 elements: chunks cut rows of 16, 48 and 64
                    hi = min(numel, lo + 24)
                    deltas.read_delta(name, lo, hi, np.zeros(hi - lo, np.float32), flat[lo:hi])
                assert np.array_equal(flat.reshape(expected.shape), expected), (key, name)


def _bert_classifier_adapter(root: Path, *, modules_to_save: bool) -> tuple[Path, Path, Path]:
    """A tiny BertForSequenceClassification (and its bare BertModel), and a LoRA adapter of the
    classifier model on query and value; with modules_to_save, the classifier is trained whole."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(4)
    config = BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        vocab_size=64, max_position_embeddings=16, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(root / "bert-cls")
    model = BertForSequenceClassification.from_pretrained(str(root / "bert-cls"))
    model.bert.save_pretrained(root / "bert-bare")
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],  # SEQ_CLS trains the classifier whole
                      task_type="SEQ_CLS" if modules_to_save else None)
    peft = get_peft_model(model, lora)
    rng = np.random.default_rng(9)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if param.requires_grad:  # the LoRA factors and the trained copy of the classifier
                param.add_(torch.from_numpy((rng.integers(-8, 9, tuple(param.shape)) / 16).astype(np.float32)))
    peft.save_pretrained(root / "bert-lora")
    return root / "bert-cls", root / "bert-bare", root / "bert-lora"


def _source_deltas(adapter_dir: Path, base_dir: Path) -> dict[str, np.ndarray]:
    """Every fused tensor's delta as the dense source reads it, whole tensors at once."""
    weights = lm.model_weights(base_dir)
    with open_checkpoint(base_dir) as model:
        fused = [FusedTensor(n, model.info(n).shape, F32, F32) for n in model.keys() if model.info(n).dtype.is_float]
    with open_checkpoint(adapter_dir) as adapter:
        deltas, zero = dense_adapter_deltas(adapter, fused)
        out = {}
        for t in fused:
            flat = np.zeros(t.numel, np.float32)
            if t.name not in zero:
                deltas.read_delta(t.name, 0, t.numel, weights[t.name].reshape(-1), flat)
            out[t.name] = flat.reshape(t.shape)
        return out


def test_a_dense_adapter_is_what_peft_merges_modules_to_save_included(tmp_path):
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    cls_dir, _, lora_dir = _bert_classifier_adapter(tmp_path, modules_to_save=True)
    merged = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(str(cls_dir)), str(lora_dir))
    merged = {k: v.numpy() for k, v in merged.merge_and_unload().state_dict().items()}
    base, deltas = lm.model_weights(cls_dir), _source_deltas(lora_dir, cls_dir)
    changed = sorted(n for n, d in deltas.items() if d.any())
    assert "classifier.weight" in changed and "bert.encoder.layer.1.attention.self.value.weight" in changed
    assert not any("key" in n or "dense" in n for n in changed)
    for name, delta in deltas.items():
        np.testing.assert_allclose(base[name] + delta, merged[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_an_adapter_of_a_task_model_reads_onto_the_bare_model(tmp_path):
    """LoRA on `bert.encoder...` of the classifier model maps onto the bare model's `encoder...`;
    a classifier trained whole has no place in the bare model and is refused."""
    _, bare_dir, lora_dir = _bert_classifier_adapter(tmp_path, modules_to_save=False)
    deltas = _source_deltas(lora_dir, bare_dir)
    assert deltas["encoder.layer.0.attention.self.query.weight"].any() and not deltas["pooler.dense.weight"].any()
    _, bare_dir, whole_dir = _bert_classifier_adapter(tmp_path / "whole", modules_to_save=True)
    line = one_line_error(run(["unify", "--base", bare_dir, "--store", "s", whole_dir, "-q"], tmp_path),
                          "replaces no floating-point tensor of the base")
    assert "tensor 'base_model.model.classifier." in line and not (tmp_path / "s").exists()


def _conv_adapter(root: Path) -> tuple[Path, Path]:
    """A model with a convolution, and a LoRA adapter on it (PEFT's Conv2d LoRA)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file as save_torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(2, 4, 3), torch.nn.Linear(4, 4)

    net = Net()
    (root / "conv-base").mkdir()
    save_torch(net.state_dict(), str(root / "conv-base" / "model.safetensors"))
    get_peft_model(net, LoraConfig(r=2, target_modules=["conv", "fc"])).save_pretrained(root / "conv-lora")
    return root / "conv-base", root / "conv-lora"


def test_adapters_a_dense_store_cannot_take_are_refused_in_one_line(gpt2, tmp_path):
    base = gpt2["base"]
    Store.unify(tmp_path / "s", base, [gpt2["d1"]], **OPTS)
    before = snapshot(tmp_path / "s")
    dora = shutil.copytree(gpt2["d2"], tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    other = lm.adapter(_narrow_gpt2(tmp_path), tmp_path / "other")  # an adapter of another model
    for bad, phrase in ((dora, "use_dora is set"), (other, "do not fit the base's")):
        one_line_error(run(["add", "--store", "s", bad, "-q"], tmp_path), phrase)
    assert snapshot(tmp_path / "s") == before

    conv_base, conv_lora = _conv_adapter(tmp_path)
    one_line_error(run(["unify", "--base", conv_base, "--store", "c", conv_lora, "-q"], tmp_path),
                   "4-D LoRA factors (a convolution)")
    assert not (tmp_path / "c").exists()


def _narrow_gpt2(root: Path) -> Path:
    from transformers import GPT2Config

    torch.manual_seed(2)
    config = GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    GPT2Model(config).save_pretrained(root / "narrow")
    return root / "narrow"


def test_a_large_target_is_computed_a_block_of_rows_at_a_time(tmp_path):
    """A rank-8 adapter on a 4096 x 16384 weight (256 MiB dense): the source holds its factors
    (640 KiB) and the caller's chunk, never the dense delta; rows it computes are the rule's."""
    rows, cols, rank = 4096, 16384, 8
    rng = np.random.default_rng(0)
    a = (rng.integers(-8, 9, (rank, cols)) / 8).astype(np.float32)
    b = (rng.integers(-8, 9, (rows, rank)) / 8).astype(np.float32)
    folder = tmp_path / "big-lora"
    folder.mkdir()
    save_file({f"{lm.PREFIX}big.lora_A.weight": a, f"{lm.PREFIX}big.lora_B.weight": b},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 16,
                                                            "target_modules": ["big"]}))
    numel, chunk = rows * cols, 1_000_000  # chunks cut rows: whole rows and partial ones
    out, base = np.empty(chunk, np.float32), np.zeros(chunk, np.float32)
    spans = [(lo, min(numel, lo + chunk)) for lo in range(0, numel, chunk)]
    with open_checkpoint(folder) as adapter:
        deltas, _ = dense_adapter_deltas(adapter, [FusedTensor("big.weight", (rows, cols), F32, F32)])
        tracemalloc.start()
        try:
            for lo, hi in spans:
                deltas.read_delta("big.weight", lo, hi, base[: hi - lo], out[: hi - lo])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert deltas.peak_factor_bytes == (rank * cols + rows * rank) * 4
        assert peak < 4 * deltas.peak_factor_bytes < numel * 4 // 64, peak  # under 2.5 MiB, against 256 MiB dense
        for lo, hi in (spans[0], spans[33], spans[-1]):  # those chunks' rows by the rule, scaling 16 / 8
            deltas.read_delta("big.weight", lo, hi, base[: hi - lo], out[: hi - lo])
            first, last = lo // cols, -(-hi // cols)
            rule = (2.0 * (b[first:last] @ a)).reshape(-1)[lo - first * cols : hi - first * cols]
            assert np.array_equal(out[: hi - lo], rule), lo


def test_adapters_run_through_real_processes_without_torch(gpt2, tmp_path):
    """condu-fuse with adapters, in fresh processes where importing torch fails."""
    for args in (["unify", "--base", gpt2["init"], "--store", "f", gpt2["f1"], gpt2["f2"]],
                 ["decouple", "--store", "f", "--task", "1", "-o", "f1-out"],
                 ["unify", "--base", gpt2["base"], "--store", "d", gpt2["d1"], gpt2["full"]],
                 ["add", "--store", "d", gpt2["d2"]], ["decouple", "--store", "d", "--task", "d2", "-o", "d2-out"]):
        done = cli_process(args, tmp_path, block="torch")
        assert done.returncode == 0, (args, done.stderr)
    assert (tmp_path / "f1-out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "d2-out" / "model.safetensors").is_file()
