"""The device pass, checked on the CPU: chunks copied up and results copied down by a DeviceStage on
torch CPU tensors, with the reference behind the kernel contract and with the Triton interpreter.
The store it writes equals the host pass's: the stages' order and buffer reuse are right."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fusion import Store, reference
from fusion.device import DeviceStage, resolve_device
from fusion.testing.checkpoints import snapshot
from fusion.testing.triton import kernel_module

from .helpers import manifest, models, one_line_error, run, stored_unified


def _host(x):
    return None if x is None else (x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x))


def _tensors(result: reference.ChunkResult) -> reference.ChunkResult:
    return reference.ChunkResult(*(None if x is None else torch.from_numpy(np.asarray(x)) for x in result))


class TorchReference:
    """fusion.reference behind the kernel contract, on torch tensors: a device kernel with known answers."""

    name = "reference-on-torch"

    def elect(self, deltas, *, unified_dtype, base=None, originals=None):
        originals = originals and originals._replace(rows=_host(originals.rows), index=_host(originals.index))
        return _tensors(reference.elect(_host(deltas), unified_dtype=unified_dtype, base=_host(base),
                                        originals=originals))

    def continual(self, unified, packed_masks, rescalers, new_deltas, *, unified_dtype, base=None, originals=None):
        originals = originals and originals._replace(rows=_host(originals.rows), index=_host(originals.index))
        return _tensors(reference.continual_chunk(_host(unified), _host(packed_masks), _host(rescalers),
                                                  _host(new_deltas), unified_dtype=unified_dtype, base=_host(base),
                                                  originals=originals))


def _triton_interpreted():
    pytest.importorskip("triton")
    return kernel_module().TritonKernel(block=16)


def _changes(path, base_path, paths, **options):
    store = Store.unify(path, base_path, paths[:2], chunk=24, **options)
    store.add(paths[2])
    store.remove(1)
    return store


def test_a_device_pass_of_the_reference_writes_the_same_store_as_the_host(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 3)
    host = _changes(tmp_path / "host", base_path, paths, kernel="reference", device="cpu")
    device = _changes(tmp_path / "device", base_path, paths, device=DeviceStage("cpu", TorchReference()))
    assert device.last_pass["device"] == "cpu" and host.last_pass["peak_device_bytes"] is None
    a, b = manifest(host.path), manifest(device.path)
    assert [t["rescaler"] for t in a["tasks"]] == [t["rescaler"] for t in b["tasks"]]
    assert [t["fidelity"] for t in a["tasks"]] == [t["fidelity"] for t in b["tasks"]]
    ua, ub = stored_unified(host.path), stored_unified(device.path)
    assert all(np.array_equal(ua[n], ub[n]) for n in ua)
    for ta, tb in zip(a["tasks"], b["tasks"]):
        assert all(np.array_equal(x, y) for x, y in zip(load_file(host.path / ta["triggers"]).values(),
                                                       load_file(device.path / tb["triggers"]).values()))


def test_the_triton_kernel_through_a_device_stage_gives_the_hosts_masks_and_unified_delta(tmp_path):
    base_path, paths, _, _ = models(tmp_path, 2)
    host = Store.unify(tmp_path / "host", base_path, paths, kernel="reference", device="cpu", chunk=24)
    device = Store.unify(tmp_path / "device", base_path, paths, device=DeviceStage("cpu", _triton_interpreted()),
                         chunk=24)
    ua, ub = stored_unified(host.path), stored_unified(device.path)
    assert all(np.array_equal(ua[n], ub[n]) for n in ua)
    for ta, tb in zip(host.tasks, device.tasks):  # L1 sums from float32 partials on the device: 1e-6
        assert tb.rescaler == pytest.approx(ta.rescaler, rel=1e-6)
        assert tb.fidelity["cosine"] == pytest.approx(ta.fidelity["cosine"], rel=1e-6)


def test_devices_resolve_without_a_gpu():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ValueError, match=r"^device='cuda': no CUDA device is available \(.+\); pass device='cpu'$"):
            resolve_device("cuda")
        flag = r"^--device cuda:1: no CUDA device is available \(.+\); use --device cpu$"
        with pytest.raises(ValueError, match=flag):
            resolve_device("cuda:1", option="--device")
    with pytest.raises(ValueError, match=r"^device='tpu': unknown device; use auto, cpu, cuda or cuda:N$"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the errors of a machine without CUDA")
def test_device_errors_name_the_setting_as_the_caller_wrote_it(tmp_path):
    """Python callers are told about `device=`, the command line about `--device`; nothing changes."""
    base_path, paths, _, _ = models(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths[:2], chunk=24)
    before = snapshot(store.path)
    python = r"^device='cuda': no CUDA device is available \(.+\); pass device='cpu'$"
    with pytest.raises(ValueError, match=python):
        store.load_task(1, device="cuda")
    with pytest.raises(ValueError, match=python):
        Store.open(store.path, device="cuda").add(paths[2])
    line = one_line_error(run(["add", "--store", "s", "--device", "cuda", paths[2]], tmp_path),
                          "--device cuda: no CUDA device is available")
    assert line.endswith("; use --device cpu") and "device='" not in line
    assert snapshot(store.path) == before


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_load_task_onto_a_device_equals_the_host_rebuild(tmp_path, dtype):
    base_path, paths, _, _ = models(tmp_path, 3)
    store = Store.unify(tmp_path / "s", base_path, paths, chunk=24)
    host = store.load_task(2, dtype=dtype, device="cpu")  # torch tensors from the host rebuild
    on_device = store.load_task(2, dtype=dtype, device=DeviceStage("cpu", kernel=None))
    assert set(host) == set(on_device)
    for name, tensor in host.items():
        assert on_device[name].dtype == tensor.dtype and torch.equal(on_device[name], tensor), name


@pytest.mark.parametrize("kernel, device, phrase", [("cpu", "cuda", "runs on the host"),
                                                    ("triton", "cpu", "runs on a CUDA device")])
def test_a_kernel_on_the_wrong_device_is_one_line(tmp_path, kernel, device, phrase):
    base_path, paths, _, _ = models(tmp_path, 1)
    with pytest.raises(ValueError, match=phrase):
        Store.unify(tmp_path / "s", base_path, paths, kernel=kernel, device=device)
    assert not (tmp_path / "s").exists()
