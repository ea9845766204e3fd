"""The pure core: losses, log-probs, metrics, the data schedule and the batch layout.

Tensors (and numpy arrays) in, tensors or small frozen dataclasses out. These modules import only torch,
numpy, the standard library and each other (import-linter's contracts in pyproject.toml check it), so they
run anywhere: a Ray worker, a test, a GPU box without Ray.

May use: nothing else of the project.
"""
