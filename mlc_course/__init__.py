"""mlc-course: build MLC LLM's multi-GPU 4-bit Llama inference from scratch with Apache TVM.

The package holds the real implementation; the notebooks in ``notebooks/`` explain it, call
it and check it. See ``docs/architecture.md`` for the map of modules.
"""

__version__ = "0.1.0"
