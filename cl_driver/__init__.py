"""Continual learning of Hugging Face CLIP with ConDU, on top of the `fusion` store.

Modules: `config` (the run YAML), `models` (CLIP, text classifiers), `data` (task specs and
sources), `train` (one fine-tune from theta0), `prototypes`, `inference` (routed experts),
`baselines`, `loop` (the continual loop, resumable), `metrics`, `prepare` (datasets to image
folders), `predict` (a run folder's continual model: `ConduCLIP`), `cli` (`condu-cl`), `mini` (the
built-in benchmark).

    from cl_driver.config import load_config
    from cl_driver.loop import run
    results = run(load_config("mini_mtil_quick"), "runs/quick")

    from cl_driver import ConduCLIP
    ConduCLIP.from_run("runs/quick").predict("photo.png")   # [{"label": ..., "score": ..., "task": ...}, ...]
"""

from fusion import passive_waiting

passive_waiting()  # before any module of the package imports torch: fusion.threads says why

__all__ = ["ConduCLIP"]


def __getattr__(name: str):
    # loaded on first use: `condu-cl -h` and the package's import stay free of torch
    if name == "ConduCLIP":
        from .predict import ConduCLIP

        return ConduCLIP
    raise AttributeError(f"module 'cl_driver' has no attribute {name!r}")
