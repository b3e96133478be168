"""Facts about the machine a run measures on: the environment capture, which GPUs a run uses and what each framework
sees of them, the CPU thread budget every backend gets, and the monitor that samples GPUs and CPUs per phase."""
