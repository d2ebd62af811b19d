"""Continual learning of Hugging Face CLIP with ConDU, on top of the `fusion` store.

Modules: `config` (the run YAML), `models` (CLIP, text classifiers), `data` (task specs and
sources), `train` (one fine-tune from theta0), `prototypes`, `inference` (routed experts),
`baselines`, `loop` (the continual loop, resumable), `metrics`, `cli` (`condu-cl`).
"""

__all__ = ["config"]
