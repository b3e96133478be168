"""cxrbench: compare deep-learning frameworks on CheXNet-style chest X-ray classification.

The core is framework-free: importing it never imports torch, tensorflow or keras. Backends are
pluggy plugins registered under the entry-point group ``cxrbench``.
"""

__version__ = "0.1.0"
