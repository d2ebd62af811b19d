"""Benchmarks of speed, memory, storage and accuracy, and their results (benchmarks/results).

Run each benchmark from the repository root as a module, `python -m benchmarks.<name>` (add
`--quick --results-dir FOLDER` for a tiny run of the same code). As a module, this folder never
lands on sys.path, so no file here can hide an installed package of the same name.
"""
