"""XLA settings oss-jax applies itself, before JAX starts its backends (XLA reads ``XLA_FLAGS`` then).

XLA's CPU scheduler orders work for concurrency by default and so keeps the temporaries of many layers
alive at once: on gpt-oss-20b that is about 4 GB above the model (``benchmarks/real_size_load.py``), the
difference between fitting a 16 GB laptop and not. oss-jax turns it off unless ``XLA_FLAGS`` already
names the flag (set it to ``true`` to keep XLA's default). Imported first by ``oss_jax/__init__.py``; it
cannot act when JAX has already run a computation before ``import oss_jax``.
"""

import os

LOW_MEMORY_CPU = "--xla_cpu_enable_concurrency_optimized_scheduler"


def apply() -> None:
    """Add ``LOW_MEMORY_CPU=false`` to ``XLA_FLAGS`` unless the flag is there already."""
    flags = os.environ.get("XLA_FLAGS", "")
    if LOW_MEMORY_CPU not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {LOW_MEMORY_CPU}=false".strip()


apply()
