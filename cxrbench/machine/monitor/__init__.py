"""Background sampling of GPUs (NVML, else GPUtil) and of the worker's CPU and memory, per phase."""
