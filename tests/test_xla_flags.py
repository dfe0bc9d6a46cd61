"""oss-jax sets XLA's low-memory CPU scheduling itself, and leaves a flag the user set alone."""

import os
import subprocess
import sys

import pytest

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


@pytest.mark.parametrize("given, want", [
    ("", f"{FLAG}=false"),
    ("--xla_force_host_platform_device_count=2", f"--xla_force_host_platform_device_count=2 {FLAG}=false"),
    (f"{FLAG}=true", f"{FLAG}=true"),  # the user's choice wins
])
def test_xla_flags(given, want):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | ({"XLA_FLAGS": given} if given else {})
    code = "import os, oss_jax, jax; jax.numpy.zeros(1).block_until_ready(); print(os.environ['XLA_FLAGS'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == want
