"""Continual learning of Hugging Face CLIP with ConDU, on top of the `fusion` store.

Modules: `config` (the run YAML), `models` (CLIP, text classifiers), `data` (task specs and
sources), `train` (one fine-tune from theta0), `prototypes`, `inference` (routed experts),
`baselines`, `loop` (the continual loop, resumable), `metrics`, `prepare` (datasets to image
folders), `cli` (`condu-cl`), `mini` (the built-in benchmark).

    from cl_driver.config import load_config
    from cl_driver.loop import run
    results = run(load_config("mini_mtil_quick"), "runs/quick")
"""

from fusion import passive_waiting

passive_waiting()  # before any module of the package imports torch: fusion.threads says why
