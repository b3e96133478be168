"""Every hook a cxrbench plugin can implement, each with its contract.

Two kinds of plugin answer these hooks:

* a **backend** (``pytorch``, ``keras``, or a third party's) implements the model hooks for one
  framework. A worker process holds exactly one backend, so the ``firstresult`` hooks below reach
  that backend and no other. A backend imports its framework only inside its hook bodies, never at
  module import, so that discovery (``cxrbench backends``) stays cheap;
* any plugin may contribute to the **all-plugins** hooks (evaluation metrics, report sections,
  data sets).

Data crosses the boundary as numpy arrays and the plain types of :mod:`cxrbench.backend.api`. Images are
always ``uint8`` gray arrays ``(N, S, S)`` from the prepared cache; the backend replicates them to
three channels and normalises them with ImageNet mean/std *on its device*. Weights cross as
canonical dicts (:mod:`cxrbench.backend.canonical`). Classes are always in :data:`cxrbench.data.classes.CLASSES`.
"""

from __future__ import annotations

import pluggy

PROJECT = "cxrbench"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- discovery -----------------------------------------------------------------------------------


@hookspec
def cxrbench_backend_info():
    """Describe the backend this plugin provides.

    Called by ``cxrbench backends`` and when the orchestrator resolves ``--backend`` names, in the
    parent process, for every registered plugin. Must be cheap and must **not** import the
    framework (read versions with :func:`importlib.metadata.version`).

    :return: a :class:`cxrbench.backend.api.BackendInfo`, or ``None`` for plugins that are not backends.
        All answers are collected.
    """


@hookspec(firstresult=True)
def cxrbench_devices():
    """The devices the backend's framework sees in this process.

    Called by ``cxrbench backends --check``, in a process of its own per backend (and in the backend's own
    environment when ``--python`` names one), so unlike :func:`cxrbench_backend_info` it imports the framework.
    The core compares the GPUs listed with the GPUs NVML shows the process: a framework that sees fewer did not
    load its CUDA libraries and would train on the CPU.

    :return: a list of strings, ``"cpu"`` first, then one per GPU (e.g. ``"cuda:0 NVIDIA H200"``); every entry
        after the first is a GPU.
    """


# -- data ----------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def cxrbench_dataset(settings):
    """Open the data set that ``settings.data`` names, as an index of images, labels and boxes.

    The core answers for ``source = "phantom"`` (generating the embedded data set on first use) and
    ``"chestxray14"`` (an NIH folder as distributed). A plugin may answer for a source of its own;
    it must return the same type so the prepared cache, splits and batch order stay the core's.

    :param settings: the run's :class:`cxrbench.suite.Settings`.
    :return: a :class:`cxrbench.data.index.DataIndex`, or ``None`` if this plugin does not know
        ``settings.data.source``. The first non-``None`` answer wins.
    """


# -- model (the selected backend answers) --------------------------------------------------------


@hookspec(firstresult=True)
def cxrbench_build_model(settings, weights):
    """Build a DenseNet with ``len(CLASSES)`` logit outputs (no sigmoid or softmax inside).

    The block configuration is ``settings.model.block_config`` (DenseNet-121 or a smaller
    variant for tests); growth 32, bottleneck 4, 64 initial features, BatchNorm epsilon 1e-5 and
    momentum 0.1 in PyTorch's convention, so that equal weights give the same function.

    :param settings: the run's :class:`cxrbench.suite.Settings` (numerics options apply here too,
        e.g. channels_last or a precision policy).
    :param weights: canonical weights (:mod:`cxrbench.backend.canonical`) to load, or ``None`` to initialise
        by ``settings.model.init``. Either way, call :func:`cxrbench.backend.initial_weights.resolve` with
        the file suffixes your framework reads itself: the core owns the policy and answers with a
        :class:`~cxrbench.backend.initial_weights.Start`. ``CANONICAL``: load its ``weights``, already
        checked against the architecture (the given weights, ``"shared"`` = the seeded
        :func:`cxrbench.backend.canonical.init_canonical` the worker also passes, or a ``.npz`` file).
        ``FRAMEWORK``: the framework's own initialiser, seeded from ``settings.run.seed``.
        ``IMAGENET``: the framework's ImageNet weights, from its local cache or the network, with
        the classifier re-initialised; a one-line :class:`~cxrbench.errors.WeightsError` when
        unavailable. ``NATIVE_FILE``: its ``path`` (checked to exist, with one of your suffixes),
        loaded without unpickling arbitrary objects; a bad file is a one-line ``WeightsError``.
        Missing files and unsupported suffixes are refused by the core with the same message for
        every backend.
    :return: the backend's model object; the core treats it as opaque. Raise
        :class:`~cxrbench.errors.BackendError` for an image size the network cannot take
        (:func:`cxrbench.backend.canonical.check_image_size`).
    """


@hookspec(firstresult=True)
def cxrbench_get_weights(model):
    """Return the model's current weights in the canonical layout.

    :return: ``dict[str, numpy.ndarray]`` (float32) with exactly the names and shapes of
        :func:`cxrbench.backend.canonical.densenet_spec`; a get/set round trip must be exact.
    """


@hookspec(firstresult=True)
def cxrbench_set_weights(model, weights):
    """Load canonical weights into ``model`` in place.

    :param weights: a canonical dict; validate it with :func:`cxrbench.backend.canonical.validate` so a
        missing or misshapen tensor raises :class:`~cxrbench.errors.WeightsError` naming it.
    :return: ``True`` (so the call is known to have been answered).
    """


@hookspec(firstresult=True)
def cxrbench_import_checkpoint(path, block_config):
    """Read a checkpoint file in the framework's own format as canonical weights (``cxrbench weights import``,
    and ``model.init = FILE`` in a run). All plugins are asked; the first answer wins.

    Decide by the file's suffix (and content) whether it is your kind, *before* importing the framework, so
    other kinds cost nothing. Never unpickle arbitrary objects. Check what you read with
    :func:`cxrbench.backend.checkpoints.check_densenet`, which names a wrong architecture, a head of another class
    count or unknown tensors in one line.

    :param path: a :class:`pathlib.Path` to an existing file that is not ``.npz`` (the core reads those).
    :param block_config: the DenseNet the weights are for (``settings.model.block_config``).
    :return: canonical weights (float32, exactly :func:`cxrbench.backend.canonical.densenet_spec`), or ``None`` when the
        file is not your kind. A file of your kind that is wrong (truncated, unknown keys, another architecture,
        a pickle you refuse) is a one-line :class:`~cxrbench.errors.WeightsError` naming the file.
    """


# -- training ------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def cxrbench_train(model, data, settings, recorder):
    """Train ``model`` in place with the suite's recipe (CheXNet's by default).

    Contract: binary cross-entropy on logits averaged over the classes; Adam with
    ``settings.train`` betas, epsilon and weight decay; learning rate scaled for several GPUs by
    ``settings.train.lr_scaling``; ReduceLROnPlateau on the validation loss; after training the
    model holds the weights of the epoch with the lowest validation loss.

    How: implement a :class:`cxrbench.backend.training.EpochLoop` and call :func:`cxrbench.backend.training.run_recipe`,
    which owns the schedule, the best weights, NaN detection (:class:`~cxrbench.errors.TrainingDiverged`),
    timing and the per-epoch records. The loop's ``train_epoch`` runs
    :func:`cxrbench.backend.training.train_epoch` over :func:`cxrbench.backend.training.train_batches` (wrapped in the
    framework's own pipeline), with a step that returns the loss on the device: the helper times the
    batches (``recorder.timed``), reports progress without a host synchronisation and fetches the losses
    once per epoch. Its ``validate`` returns :func:`cxrbench.backend.training.validation_loss` (every validation
    image once, summed per batch on the device, one reduction; an empty split is the core's
    :class:`~cxrbench.errors.DataError`). Input: batches from ``data.batches(...)``
    (:class:`cxrbench.data.prepared.PreparedData`), which fixes the sample order and the (already
    applied) horizontal flips for every epoch and rank, so every backend sees identical batches.

    Devices and numerics (``docs/devices-and-numerics.md``): ``settings.run.gpus`` = 0 is the first GPU
    if any, else the CPU; N is exactly N GPUs with the framework's own data-parallel engine (DDP,
    ``tf.distribute``), rank 0 reporting. Each ``settings.numerics`` option is honoured or refused with a
    one-line :class:`~cxrbench.errors.BackendError`. Running out of device memory raises the core's
    message (:func:`cxrbench.errors.out_of_memory_as_error` around the framework's exception).

    :return: a dict with at least ``best_epoch`` and ``best_val_loss`` (``run_recipe``'s result), and
        ``"numerics"``: the record of what was in force, made with :func:`cxrbench.backend.numerics_record.build`
        (exactly its keys, read back from the framework; framework-specific values under ``"framework"``).
        The core refuses a record with a missing or unknown key. Optionally ``"peak_memory"``:
        ``{"mib": ..., "source": ...}``, the framework's own peak device allocation while training (empty or
        absent on the CPU), written beside the monitor's NVML figure.
    """


# -- several machines (ranks started by the framework's own launcher) ---------------------------------------


@hookspec(firstresult=True)
def cxrbench_node_launcher(settings, head):
    """How this backend's ranks are started on one machine of a multi-node run (``run.nodes`` > 1).

    Called by the core where one process per machine runs (a Slurm task of ``--executor slurm``), before the
    worker module: the core runs ``[python, "-u", *answer, "-m", "cxrbench.run.worker", ...]`` on every machine.
    The launcher is the framework's own; cxrbench chooses no port and parses no node list.

    :param settings: the cell's :class:`cxrbench.suite.Settings` (``run.nodes``, ``run.gpus`` per node).
    :param head: the host name of the job's first machine (the scheduler's own answer), for a rendezvous endpoint.
    :return: the interpreter arguments that launch this machine's ranks (e.g. ``["-m", "torch.distributed.run",
        "--nnodes", "2", ...]``), or ``[]`` when the worker itself is the one rank of this machine and joins
        from the environment (``TF_CONFIG``/Slurm, ``jax.distributed``). ``None``: the backend cannot span machines.
    """


@hookspec(firstresult=True)
def cxrbench_join_world(settings):
    """Join the world a launcher formed, in a worker started with ``--launched``, before anything else.

    Contract: use the framework's own engine (torch: ``init_process_group`` from torchrun's environment; Keras:
    ``MultiWorkerMirroredStrategy`` from ``TF_CONFIG`` or ``SlurmClusterResolver``; JAX:
    ``jax.distributed.initialize()``); then refuse any world whose replica count differs from
    :func:`cxrbench.backend.expected_replicas` with :func:`cxrbench.backend.require_world_size` (one line). Later
    hooks of this process (build, train) use the joined world. Training is the only collective stage: the core
    runs the stages before it on every rank, the ones after it on rank 0 only, on a model local to that rank.

    :param settings: the run's :class:`cxrbench.suite.Settings`.
    :return: a :class:`cxrbench.backend.World`; ``None`` (no answer): the backend has no launched mode, and the
        core says so.
    """


@hookspec(firstresult=True)
def cxrbench_gather(payload):
    """Every rank's ``payload`` on rank 0, over the framework's collectives, after training.

    Called once by every rank of a launched world (the collective needs them all). Encode with
    :func:`cxrbench.backend.encode_payload`, pad every rank's bytes to the longest with
    :func:`cxrbench.backend.pad_payload` (collectives move one shape), decode with
    :func:`cxrbench.backend.decode_payloads`.

    :param payload: a JSON-able value (this rank's record and monitor samples).
    :return: on rank 0 the list of every rank's payload in rank order; on the other ranks an empty list.
    """


@hookspec(firstresult=True)
def cxrbench_predict(model, images, settings):
    """Logits for ``images`` in eval mode, without gradients, batched by the backend.

    :param images: ``uint8`` array ``(N, S, S)`` with ``S = settings.data.image_size``; N may be 0.
        Check it first with :func:`cxrbench.backend.model_inputs.check_images` (one-line
        :class:`~cxrbench.errors.BackendError` for anything else), then never cast or reshape it.
    :param settings: ``settings.eval.tta_hflip`` averages the logits of each image and its
        horizontal mirror; ``settings.train.batch_size`` bounds the inference batch.
    :return: ``float32`` array ``(N, len(CLASSES))`` of logits (the core applies the sigmoid).
    """


@hookspec(firstresult=True)
def cxrbench_cam(model, images, classes, settings):
    """Class activation maps for the given classes, at the final feature map's resolution.

    Check the inputs first with :func:`cxrbench.backend.model_inputs.check_cam_inputs`: images as for
    :func:`cxrbench_predict` and at least one of them, at least one class index, each in range.

    :param images: ``uint8`` array ``(N, S, S)`` with ``S = settings.data.image_size``, N >= 1.
    :param classes: indices into :data:`cxrbench.data.classes.CLASSES`; the maps follow their order.
    :param settings: ``settings.train.batch_size`` bounds the inference batch, as in prediction.
    :return: a :class:`cxrbench.backend.api.CamResult`; its identity ``maps.mean((2, 3)) + bias == logits``
        is checked by the conformance kit.
    """


@hookspec(firstresult=True)
def cxrbench_export_onnx(model, path, settings):
    """Export the model to ONNX at ``path``.

    Input: float32, ImageNet-normalised, three channels, dynamic batch axis, in the backend's
    layout (NCHW or NHWC, stated in the result); outputs: logits first, then ``features``
    (:data:`cxrbench.deploy.onnx_file.FEATURES_OUTPUT`), the final feature map after the last BatchNorm
    and ReLU in the same layout. Opset ``settings.export.opset``. The backend stamps the metadata of
    :func:`cxrbench.deploy.onnx_file.model_metadata` and :func:`cxrbench.deploy.onnx_file.cam_metadata` (the
    classifier weight ``(classes, K)`` and bias) with :func:`cxrbench.deploy.onnx_file.stamp_metadata`, so
    a CAM needs only onnxruntime and numpy; the core checks it with ``onnx.checker``, compares
    onnxruntime with :func:`cxrbench_predict` and checks the CAM identity on the export.

    :return: a :class:`cxrbench.backend.api.ExportInfo`.
    """


# -- explaining speed (the selected backend answers) ---------------------------------------------


@hookspec(firstresult=True)
def cxrbench_peak_flops(settings):
    """The dense-matmul ceiling of the device the run trains on, measured by the backend's own framework.

    Called once per worker, before training (the ``ceiling`` stage), after the model is built, so the framework's
    thread budget and numerics are in force. The core divides the achieved model FLOP/s of training by it (model
    FLOPs utilisation, :mod:`cxrbench.metrics.flops`).

    How: call :func:`cxrbench.backend.profiling.measure_matmul_peak` with ``make(n)``, which allocates two ``n x n``
    matrices on the run's first device in the run's precision (``settings.numerics.precision``; fp32 on tensor
    cores only where ``settings.numerics.tf32`` allows it) and returns a call that multiplies them, and the
    framework's device synchronisation. The core owns the sizing, the repeats and the time budget (seconds).

    :return: a :class:`cxrbench.backend.profiling.PeakFlops`, or ``None`` when the backend cannot measure one (the
        run then reports the achieved FLOP/s without a measured fraction, and says why).
    """


@hookspec(firstresult=True)
def cxrbench_profiler(loop, settings, trace_dir):
    """The framework's own profiler, for the profile stage (a few steady training steps, cut into categories).

    After training, the core runs a few more steps of ``loop`` (the epoch loop ``run_recipe`` ran, so nothing is
    compiled again): ``profile.warmup_steps`` unprofiled, then ``start()``, the profiled steps inside
    ``annotate(PROFILE_REGION)`` with ``annotate(INPUT_REGION)`` around each wait for a batch, the device
    synchronised at the region's edges only, then ``stop()``. The core restores the trained weights afterwards
    (``cxrbench_set_weights``), so the steps change nothing the later stages see.

    :param loop: the backend's own epoch loop (a backend may read what it compiled, e.g. XLA's HLO).
    :param settings: the run's :class:`cxrbench.suite.Settings`.
    :param trace_dir: a :class:`pathlib.Path` folder in the run folder for the raw traces, which are kept (they
        open in Perfetto or TensorBoard): write them compressed where the viewer reads that.
    :return: a :class:`cxrbench.backend.profiling.Profiler` whose ``stop()`` returns a
        :class:`~cxrbench.backend.profiling.ProfileTrace`: one :class:`~cxrbench.backend.profiling.TraceEvent` per
        operation (``kind="op"``: CPU operations, GPU kernels; with the framework's path of the operation as
        ``scope`` where it has one), the two annotations and any other host spans (``kind="host"``), and the trace
        files. ``None``: the backend has no profiler (the stage says so). Raise
        :class:`~cxrbench.errors.BackendError` with one line when the framework's profiler is unavailable here: the
        run goes on without the profile.
    """


@hookspec(firstresult=True)
def cxrbench_idiomatic_loop(settings, weights):
    """Optional: the framework's own idiomatic training step, the yardstick of the harness-overhead benchmark
    (``cxrbench overhead``, ``run.overhead_rounds``), which times it in a fresh process against this backend's
    :func:`cxrbench_train` in another, so that a speed verdict measures the framework and not cxrbench.

    Contract: what a user of the framework writes without cxrbench, on the same problem: the framework's
    reference DenseNet (or, without one, the backend's own network) for ``settings.model.block_config`` and
    ``settings.data.image_size`` with 14 logit outputs, started from ``weights``; BCE on logits; the framework's
    standard Adam at ``settings.train.learning_rate``; batches of ``settings.train.batch_size`` normalised float
    images and labels made in memory, on the device, before the first step; the same device, precision,
    compilation switches and CPU thread budget (:func:`cxrbench.machine.budget.thread_budget`) as the backend's
    training. None of cxrbench's machinery inside the step.

    :param settings: the run's validated settings.
    :param weights: canonical weights to start from (``model.init`` does not apply).
    :return: a :class:`cxrbench.backend.api.IdiomaticLoop`, or ``None`` (not every backend has one: the benchmark
        then says so in one line).
    """


# -- all plugins ---------------------------------------------------------------------------------


@hookspec
def cxrbench_evaluate(labels, scores, classes, groups, settings):
    """Metrics of predicted scores against labels. Every plugin may contribute.

    The core's built-in plugin answers with per-class and mean AUROC and bootstrap confidence
    intervals that resample patients (:mod:`cxrbench.metrics.auroc`).

    :param labels: ``(N, C)`` array of 0/1.
    :param scores: ``(N, C)`` float array (probabilities or logits: AUROC is rank-based).
    :param classes: the C class names, in column order.
    :param groups: ``(N,)`` array, the patient id of each row. Images of one patient are correlated:
        resample or count *patients* for intervals and tests (a cluster bootstrap). An implementation
        may leave this argument out (pluggy passes only the arguments it names); the core then notes
        in metrics.json (``independence_notes``) and the report that its intervals treat images as
        independent.
    :return: a dict of JSON-serialisable metrics whose top-level keys do not collide with other
        plugins' (namespace them), or ``None``. The core merges all answers.
    """


@hookspec
def cxrbench_report_sections(run):
    """Extra sections for the HTML report.

    :param run: the merged run folder contents (``run.json`` as a dict, plus ``"path"``).
    :return: a list of ``(title, html)`` pairs, or ``None``. ``title`` is escaped by the report;
        ``html`` is inserted as given, so a plugin must escape its own data.
    """


@hookspec
def cxrbench_operation_rules():
    """Rules that map a framework's operation names to the core's categories
    (:mod:`cxrbench.metrics.operation_categories`). Every plugin may contribute; a backend adds its framework's
    names (layer scopes, autograd nodes, XLA ``op_name`` paths) that the core's generic rules cannot place.

    :return: a list of :class:`cxrbench.backend.OperationRule`, searched in order (all plugins' lists, then the
        core's generic rules) in each operation's path; the first match decides. Must not import the framework.
    """


@hookspec
def cxrbench_record_scalars(run_dir, backend, records):
    """Record one backend's training curves and final figures in an experiment tracker. Every plugin may answer.

    The core's built-in answer writes TensorBoard event files to ``RUN/tensorboard/<backend>/``
    (:mod:`cxrbench.report.tensorboard`); an MLflow, Weights & Biases or other tracker is a plugin of a few lines
    (``docs/tracking.md``). Called by the run's own process (which holds no framework) once a backend's worker has
    ended, whether it completed or failed, with the curves read back from the files the worker wrote
    (``history.json``, ``monitor.jsonl``, ``metrics.json``; :mod:`cxrbench.run.tracking`). A resumed run may call it
    again for a backend whose worker ran again: the later call carries the whole record and should replace the
    earlier one. A failing implementation is reported as a warning naming the plugin; it never fails the run.

    :param run_dir: the run folder (:class:`pathlib.Path`).
    :param backend: the backend's name.
    :param records: a list of ``{"step": int, "wall_time": float | None, "scalars": {tag: float}}``, one per
        epoch (``step`` is the 1-based epoch; ``wall_time`` the epoch's end in seconds since the epoch of Unix time,
        when the monitor saw it). Tags: ``loss/train``, ``loss/validation``, ``learning_rate``,
        ``throughput/images_per_s`` (whole epoch), ``throughput/steady_images_per_s`` (after the warm-up, when
        steady), ``time/data_wait_share``, ``gpu/utilisation_percent`` and ``gpu/memory_mib`` (GPU runs),
        ``host/cpu_percent`` and ``host/rss_mib`` (the worker's process tree); the last epoch's record also carries
        the final ``auroc/<class>`` and ``auroc/mean`` of the kept model. A figure that was not measured is absent.
    :return: ``None``, or one line for the user (such as what to install to get the curves); the run prints each
        distinct line once.
    """
