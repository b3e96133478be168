"""TensorFlow's operation names in the core's categories (``cxrbench_operation_rules``); no TensorFlow import.

A TensorFlow operation's path is its node name inside the compiled step, then its op type
(``StatefulPartitionedCall/gradient_tape/densenet_6_12_24_16/conv2_block1_0_bn/moments/Mean/Mean``): Keras names
the scopes after the layers of ``keras.applications.densenet`` (``convB_blockL_0_bn``, ``poolT_conv``, ``bn``,
``classifier``), puts the backward pass under ``gradient_tape/`` and the optimizer under its own name
(``torch_adam``). The layer is what decides: BatchNorm's moments are ``Mean`` and ``SquaredDifference`` ops that the
generic rules would call pooling and element-wise.
"""

from cxrbench.backend import category_rules

#: A Keras layer scope, ``name`` or ``name_N`` (Keras numbers a scope it enters again).
LAYER = r"(^|/)({})(_\d+)?/"

OPERATION_RULES = [
    *category_rules("optimizer", r"(^|/)\w*adam\w*/"),
    # the loss is sigmoid_cross_entropy_with_logits (scope logistic_loss), then its sum over the batch at the top
    *category_rules("loss", r"(^|/)logistic_loss(_\d+)?/", r"^StatefulPartitionedCall/Sum(_\d+)?/"),
    *category_rules(
        "conv_backward", r"(^|/)gradient_tape/.*" + LAYER.format(r"conv\d+_block\d+_\d+_conv|pool\d+_conv|conv1_conv")
    ),
    *category_rules("conv_forward", LAYER.format(r"conv\d+_block\d+_\d+_conv|pool\d+_conv|conv1_conv")),
    *category_rules("batch_norm", LAYER.format(r"conv\d+_block\d+_\d+_bn|pool\d+_bn|conv1_bn|bn")),
    *category_rules("elementwise", LAYER.format(r"conv\d+_block\d+_\d+_relu|pool\d+_relu|conv1_relu|relu")),
    *category_rules("concat_copy", LAYER.format(r"conv\d+_block\d+_concat|zero_padding2d")),
    *category_rules("pooling", LAYER.format(r"pool\d+_pool|pool1|avg_pool")),
    *category_rules("matmul", LAYER.format("classifier")),
    *category_rules("overhead", r"(^|/)(Read|Assign)\w*VariableOp$", r"(^|/)(Identity|NoOp|_Send|_Recv)$"),
]
