"""XLA's operations of the JAX step in the core's categories (``cxrbench_operation_rules``); no jax import.

An operation's path is the ``op_name`` metadata JAX gives each HLO instruction of the compiled step, then the
instruction's kind: ``jit(step)/jvp(DenseNet)/...`` is the forward pass, ``jit(step)/transpose(jvp(DenseNet))/...``
its gradient, with Flax's module names inside (``features_denseblock1_denselayer1_norm2``, named after the
canonical layers, and ``DenseNet.bn_relu`` around each BatchNorm + ReLU). What the step computes outside the
network's differentiated function is optax's Adam update; ``jvp()`` alone is the loss function's own work (the
binary cross-entropy, and the few element-wise operations that normalise the uint8 input in front of the network).
Instructions without metadata (XLA's copies and layout changes of the parameters) fall to the generic rules.
"""

from cxrbench.backend import category_rules

#: The jitted step as JAX names it (``jit(step)``).
STEP = r"^jit\(\w+\)/"

OPERATION_RULES = [
    *category_rules("optimizer", STEP + r"(?!(transpose\()?jvp\()", r"^state\.opt_state\b"),
    *category_rules("loss", STEP + r"(transpose\()?jvp\(\)"),
    *category_rules("conv_backward", r"transpose\(jvp\(\w+\)\).*/conv_general_dilated"),
    *category_rules("conv_forward", r"/conv_general_dilated"),
    *category_rules("batch_norm", r"/features_\w*norm\d*/"),
    *category_rules("elementwise", r"/\w+\.bn_relu/"),
    *category_rules("concat_copy", r"\.features/(concatenate|split)\b", r"^state\.(params|batch_stats)\b"),
    *category_rules(
        "pooling",
        r"\.features/(reduce_window\w*|div|select_and_scatter|pad)\b",  # pad: max pooling's -inf border
        r"jvp\(\w+\)\)?/(reduce_sum|div)\b",  # the global average pool in front of the classifier
    ),
    *category_rules("matmul", r"/classifier/"),
]
