"""Benchmarks record what they ran on: framework versions and GPUs join pytest-benchmark's machine info."""

from cxrbench.machine.env import gpu_inventory, package_versions


def pytest_benchmark_update_machine_info(config, machine_info):
    """Saved runs (``--benchmark-autosave``) then compare like with like; no framework is imported."""
    machine_info["cxrbench"] = {
        "packages": {name: version for name, version in package_versions().items() if version},
        "gpu": gpu_inventory(),
    }
