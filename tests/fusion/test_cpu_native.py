"""The native backend of the cpu kernel: its C library is built when the package is installed and
loaded from the package's own folder only; nothing is built, cached or loaded elsewhere. Where the
library is missing or does not fit, the numba backend (or the reference) runs and says why. Its
results are tested in test_cpu_kernel.py (every test there runs on both backends)."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fusion
from fusion.dtypes import BF16, F16, F32, Q4, Q8
from fusion.kernels import cpu_native
from fusion.kernels.cpu import CpuKernel
from fusion.reference import OWN_ROW, Originals
from fusion.testing.strategies import as_dtype

LIBRARY = cpu_native._PATH
SOURCE = LIBRARY.with_name("cpu_native.c")
COMPILER = shutil.which(os.environ.get("CC", "cc"))
NOT_BUILT = f"{cpu_native._MODULE} is not built: reinstall with a C compiler (pip install -e . / make install)"

built = pytest.mark.skipif(not LIBRARY.is_file(), reason="the package was installed without its C library")
compiler = pytest.mark.skipif(COMPILER is None or not SOURCE.is_file(), reason="no C compiler or no cpu_native.c here")

PROBE = """
import numpy as np
from fusion.kernels import cpu_native
from fusion.kernels.cpu import CpuKernel
from fusion.reference import elect
deltas = np.random.default_rng(0).standard_normal((3, 100_000), dtype=np.float32)  # blocks for two threads
kernel = CpuKernel()
result = kernel.elect(deltas)
assert np.array_equal(result.unified, elect(deltas).unified)
print(kernel.backend.NAME)
print(cpu_native._state.get("error", ""))
"""

# The shared libraries this process has mapped whose name holds cpu_native: the ones it loaded.
MAPPED = """
with open("/proc/self/maps") as maps:
    print(sorted({line.split(maxsplit=5)[-1].strip() for line in maps if "cpu_native" in line.rsplit("/", 1)[-1]}))
"""


def _run(code: str, *, cwd=None, **env: str) -> list[str]:
    """The lines `code` prints in a new interpreter, with `env` added and no backend chosen."""
    environment = {**os.environ, **env}
    environment.pop("CONDU_CPU_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd=cwd,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _homes(tmp_path: Path) -> dict[str, str]:
    """HOME, XDG_CACHE_HOME and the old CONDU_CACHE_DIR, each a folder of its own under tmp_path."""
    homes = {name: tmp_path / name.lower() for name in ("HOME", "XDG_CACHE_HOME", "CONDU_CACHE_DIR")}
    for folder in homes.values():
        folder.mkdir()
    return {name: str(folder) for name, folder in homes.items()}


def _files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@built
def test_loaded_from_the_package_folder_and_nothing_written_elsewhere(tmp_path):
    homes = _homes(tmp_path)
    lines = _run(PROBE + MAPPED, **homes)
    assert lines[:2] == ["native", ""]
    assert LIBRARY.parent == Path(fusion.kernels.__file__).parent
    if Path("/proc/self/maps").exists():
        assert lines[2] == str([str(LIBRARY.resolve())])
    assert _files(tmp_path) == sorted(["home", "xdg_cache_home", "condu_cache_dir"]), "a cache was written"


@built
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps to see what was loaded")
def test_libraries_planted_in_the_old_cache_folders_are_never_loaded(tmp_path):
    """Where the library used to be built and cached, a planted one that would load is ignored:
    world-writable, another user's, a symlink to a world-writable file, in a 0777 parent."""
    homes = _homes(tmp_path)
    planted = []

    def plant(folder: Path, name: str = "cpu_native-0123456789abcdef0123.so") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(LIBRARY, folder / name)  # a genuine library: it would show in the maps if loaded
        planted.append(folder / name)
        return folder / name

    plant(Path(homes["CONDU_CACHE_DIR"]) / "kernels").chmod(0o666)
    writable = plant(Path(homes["XDG_CACHE_HOME"]) / "elsewhere", "writable.so")
    writable.chmod(0o666)
    (Path(homes["XDG_CACHE_HOME"]) / "condu" / "kernels").mkdir(parents=True)
    (Path(homes["XDG_CACHE_HOME"]) / "condu" / "kernels" / "cpu_native-0123456789abcdef0123.so").symlink_to(writable)
    home_cache = Path(homes["HOME"]) / ".cache" / "condu"
    other = plant(home_cache / "kernels")
    if os.geteuid() == 0:  # another owner can be given only by root
        os.chown(other, 65534, 65534)
    home_cache.chmod(0o777)
    before = {path: path.read_bytes() for path in planted}

    lines = _run(PROBE + MAPPED, **homes)
    assert lines[:2] == ["native", ""]
    assert lines[2] == str([str(LIBRARY.resolve())]), "a library outside the package folder was loaded"
    assert {path: path.read_bytes() for path in planted} == before


def test_without_the_library_the_numba_backend_runs_and_says_why(tmp_path):
    missing = tmp_path / LIBRARY.name
    code = f"from fusion.kernels import cpu_native\ncpu_native._PATH = cpu_native.Path({str(missing)!r})\n" + PROBE
    code += """
from fusion.kernels.cpu import load_backend
try:
    load_backend("native")
except RuntimeError as error:
    print(error)
"""
    backend, why, asked_by_name = _run(code)
    assert backend == "numba" and why == NOT_BUILT
    assert asked_by_name == f"cpu kernel: the native backend is not available: {NOT_BUILT}"


def test_a_source_checkout_never_installed_runs_the_reference_without_numba(tmp_path):
    """The fusion folder alone, no library beside cpu_native.py and no numba: the reference does the
    work, and the cpu kernel says why for each backend in one line."""
    shutil.copytree(Path(fusion.__file__).parent, tmp_path / "fusion",
                    ignore=shutil.ignore_patterns("__pycache__", "_cpu_native.*"))
    code = """
import sys
sys.modules["numba"] = None  # import numba fails
import fusion
from fusion.kernels import get_kernel
from fusion.kernels.cpu import load_backend
print(fusion.__file__)
print(get_kernel(work=1 << 40).name)
try:
    load_backend()
except ImportError as error:
    print(error)
"""
    where, kernel, why = _run(code, cwd=tmp_path)
    assert Path(where).is_relative_to(tmp_path)
    assert kernel == "reference"
    assert why.startswith(f"cpu kernel: the native backend is not available: {NOT_BUILT}; "
                          "fusion.kernels.cpu_numba needs numba (")
    assert why.endswith("): pip install 'condu[numba]'")


def _compile(tmp_path: Path, name: str, source: Path, *flags: str) -> Path:
    """A shared library built from `source` with the flags setup.py gives, and `flags`."""
    out = tmp_path / f"{name}.so"
    command = [COMPILER, "-O3", "-std=c11", "-ffp-contract=off", "-fPIC", "-shared", *flags, "-o", str(out), str(source)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


@compiler
def test_a_library_built_from_another_source_is_refused(tmp_path):
    """A struct of another layout would be misread: a library whose Pass differs is refused, and the
    numba backend runs instead; so is one without the loader's entry points."""
    (tmp_path / "other").mkdir()
    other_source = SOURCE.read_text().replace("    _Atomic int64_t next_block;", "    int64_t added_later;\n"
                                                                                 "    _Atomic int64_t next_block;")
    (tmp_path / "other" / "cpu_native.c").write_text(other_source)
    other = _compile(tmp_path, "other", tmp_path / "other" / "cpu_native.c", "-DCONDU_CLONES=")
    (tmp_path / "unrelated.c").write_text("int unrelated(void) { return 0; }\n")
    unrelated = _compile(tmp_path, "unrelated", tmp_path / "unrelated.c")
    size = cpu_native.ctypes.sizeof(cpu_native._Pass)
    with pytest.raises(OSError, match=rf"^other.so was built from another cpu_native.c \(its Pass is {size + 8} bytes, "
                                      rf"this module's {size}\): reinstall with a C compiler"):
        cpu_native._open(other)
    with pytest.raises(OSError, match=r"^unrelated.so does not load as the cpu kernel's library \(.*condu_pass_size"):
        cpu_native._open(unrelated)
    code = f"from fusion.kernels import cpu_native\ncpu_native._PATH = cpu_native.Path({str(other)!r})\n" + PROBE
    backend, why = _run(code)
    assert backend == "numba" and "was built from another cpu_native.c" in why


@compiler
def test_a_library_older_than_the_source_beside_it_is_refused(tmp_path):
    """A checkout's cpu_native.c edited since the install: its library would run the old loops."""
    shutil.copyfile(SOURCE, tmp_path / "cpu_native.c")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    library = _compile(tmp_path, "_cpu_native", tmp_path / "cpu_native.c", "-DCONDU_CLONES=",
                       f'-DCONDU_SOURCE_SHA256="{digest}"')
    assert cpu_native._open(library)
    with open(tmp_path / "cpu_native.c", "a") as source:
        source.write("/* edited after the build */\n")
    with pytest.raises(OSError, match=r"^_cpu_native.so was built from another cpu_native.c than the one beside it: "
                                      r"reinstall with a C compiler"):
        cpu_native._open(library)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            return set(next((line for line in info if line.startswith("flags")), "").split())
    except OSError:
        return set()


def _chunk_results(kernel: CpuKernel) -> list:
    """Every pass the library runs, on inputs with exact zeros, ties and both signs: elect in the three
    storage dtypes, from fp16 and bf16 rows, with a base and fidelity; the continual step; a rebuild."""
    rng = np.random.default_rng(7)
    n = 3 * 4096 + 13  # whole blocks, a partial one, a partial mask byte
    rows = rng.standard_normal((5, n), dtype=np.float32)
    rows[:, ::7] = 0.0
    rows[1, ::5] = -rows[0, ::5]  # sums that cancel exactly
    rows[2, ::11] *= 2.0**-20
    base = rng.standard_normal(n, dtype=np.float32)
    results = [kernel.elect(rows, unified_dtype=dtype) for dtype in (F32, F16, BF16, Q8, Q4)]
    results += [kernel.elect(as_dtype(rows, F16)), kernel.elect(as_dtype(rows, BF16))]
    originals = Originals(rows[:2] + base, np.array([0, 1, OWN_ROW, OWN_ROW, OWN_ROW]))
    results.append(kernel.elect(rows + base, base=base, originals=originals, unified_dtype=BF16))
    first = results[0]
    results.append(kernel.continual(first.unified, first.packed_masks[:3], np.array([0.9, 1.37, 1e-3]), rows[3:]))
    quantized = results[4]  # the continual step of the compact store: from code * scale, back to int4 blocks
    results.append(kernel.continual(quantized.unified, quantized.packed_masks[:3], np.array([0.9, 1.37, 1e-3]),
                                    rows[3:], unified_dtype=Q4))
    rebuilt = np.empty(n, dtype=np.float32)
    cpu_native.rebuild(base, first.unified, np.ascontiguousarray(first.packed_masks[1]), 1.37, rebuilt)
    return results + [rebuilt]


# The CPU flags (Linux /proc/cpuinfo names) each version of the library needs to run.
NEEDS = {"avx2": {"avx2"}, "arch=x86-64-v3": {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}}
NEEDS["arch=x86-64-v4"] = NEEDS["arch=x86-64-v3"] | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def _dispatched_versions(tmp_path: Path) -> list[str]:
    """The targets the compiler here builds cpu_native.c's functions for, as its preprocessor says."""
    (tmp_path / "versions.c").write_text(f'#include "{SOURCE}"\nCONDU_CLONES_ARE CONDU_CLONES\n')
    done = subprocess.run([COMPILER, "-E", "-P", str(tmp_path / "versions.c")], capture_output=True, text=True,
                          timeout=60, check=True)
    expanded = done.stdout.rsplit("CONDU_CLONES_ARE", 1)[1]
    return [name for name in re.findall(r'"([^"]+)"', expanded) if name != "default"]


@compiler
def test_every_version_the_dispatch_may_pick_gives_the_same_bits(tmp_path, monkeypatch):
    """The library holds each loop for every instruction-set level it names and the baseline; each
    built alone (the same loops, one target for all) gives the bits of the baseline, and so does the
    installed library."""
    versions = {"baseline": "-DCONDU_CLONES="}
    for name in _dispatched_versions(tmp_path):
        assert name in NEEDS, f"cpu_native.c dispatches to {name}: say in NEEDS what it needs of the CPU"
        if NEEDS[name] <= _cpu_flags():
            versions[name] = f'-DCONDU_CLONES=__attribute__((target("{name}")))'
    if len(versions) == 1 and not LIBRARY.is_file():
        pytest.skip("a CPU that runs only the baseline, and no installed library to compare")
    libraries = {name: cpu_native._open(_compile(tmp_path, name.replace("=", "-"), SOURCE, flag))
                 for name, flag in versions.items()}
    if LIBRARY.is_file():
        libraries["installed"] = cpu_native._open(LIBRARY)
    outputs = {}
    for name, library in libraries.items():
        monkeypatch.setattr(cpu_native, "_state", {"library": library})
        outputs[name] = _chunk_results(CpuKernel(backend="native"))
    expected = outputs.pop("baseline")
    for name, results in outputs.items():
        for got, want in zip(results, expected):
            if isinstance(want, np.ndarray):  # the rebuild
                assert np.array_equal(got.view(np.int32), want.view(np.int32)), name
                continue
            assert np.array_equal(got.unified.view(np.int32), want.unified.view(np.int32)), name
            assert np.array_equal(got.packed_masks, want.packed_masks), name
            if want.scales is not None:  # int8 / int4 blocks
                assert np.array_equal(got.scales.view(np.int32), want.scales.view(np.int32)), name
            np.testing.assert_allclose(got.delta_l1, want.delta_l1, rtol=1e-12, err_msg=name)
            np.testing.assert_allclose(got.masked_l1, want.masked_l1, rtol=1e-12, err_msg=name)
            if want.fidelity is not None:
                np.testing.assert_allclose(got.fidelity, want.fidelity, rtol=1e-9, atol=1e-9, err_msg=name)


@built
def test_a_forked_child_runs_the_kernel():
    """Threads do not survive a fork: a child makes a pool of its own instead of waiting forever."""
    code = PROBE + """
import multiprocessing
with multiprocessing.get_context("fork").Pool(1) as pool:
    child = pool.apply_async(CpuKernel().elect, (deltas,)).get(timeout=60)
print(np.array_equal(child.unified, result.unified))
"""
    lines = _run(code)
    assert lines[0] == "native" and lines[-1] == "True"
