"""cxrbench: compare deep-learning frameworks on CheXNet-style chest X-ray classification.

The core is framework-free: importing it never imports torch, tensorflow, keras or jax. Backends (PyTorch, Keras,
JAX, a third party's) are pluggy plugins, each its own distribution, registered under the entry-point group
``cxrbench``. The package, by audience:

for backend authors
    ``backend/``     the one import surface (:mod:`cxrbench.backend`) and the machinery behind it: result types,
                     the training recipe and loop helpers, the recorder and window timer, canonical and initial
                     weights, checkpoint checks, the input contract, the numerics record, the ONNX graph writer
    ``hookspecs``    every hook, with its contract
    ``testing/``     the conformance kit (``pytest --cxrbench-backend NAME``)
the machine
    ``machine/``     environment capture, which GPUs a run uses, each framework's view of them, the CPU thread
                     budget, the monitor (GPU/CPU sampling per phase, the noise guard)
a run
    ``cli``          the ``cxrbench`` command
    ``plugins``      the plugin manager and the one list of first-party backends
    ``suite``        suite files -> validated settings
    ``data/``        NIH ChestX-ray14 reader, phantom generator, splits, prepared cache, batch order, classes
    ``run/``         the orchestrator, one worker per backend, the run folder's format (``run/folder.py``), the
                     cross-backend comparison, repeats, sweeps
    ``metrics/``     AUROC with patient-clustered intervals, paired comparisons, localisation, equivalence
    ``cam/``         class activation maps as pictures: the one overlay, a backend's CAM files
    ``report/``      the HTML report and run-to-run comparison
    ``builtin``      the core's own plugins (data sets, AUROC evaluation)
using the results
    ``results``      a run as pandas tables, and the ``cxrbench results`` command
    ``deploy/``      an export without its framework: its metadata and onnxruntime checks, predict, serve
shared by all
    ``errors``       the error kinds and their one-line messages
    ``files``        atomic file writes, free-space checks
"""

from cxrbench import _moved

__version__ = "0.1.0"
__all__ = ["__version__"]

_moved.install()
