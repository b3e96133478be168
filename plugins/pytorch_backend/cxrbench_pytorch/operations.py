"""PyTorch's operation names in the core's categories (``cxrbench_operation_rules``); no torch import.

Paths are the nesting of torch.profiler's spans on a thread (GPU kernels carry their launching operators' path):
the backward of each operation runs inside ``autograd::engine::evaluate_function: <Node>Backward``, Adam inside
``Optimizer.step#Adam.step``, the forward inside the ATen operator the network called (``aten::conv2d``,
``aten::batch_norm``, ``aten::cat``), so the rules that claim whole operations come first and the rules for the
small operators they call (views, allocations) last.
"""

from cxrbench.backend import category_rules

#: ``(^|/)aten::name\b``: an ATen operator anywhere in the path.
ATEN = r"(^|/)aten::({})\b"

OPERATION_RULES = [
    *category_rules("optimizer", r"^Optimizer\.(step|zero_grad)", r"torch::autograd::AccumulateGrad"),
    *category_rules("loss", r"binary_cross_entropy|BinaryCrossEntropy"),
    *category_rules("conv_backward", r"ConvolutionBackward|convolution_backward"),
    *category_rules("conv_forward", ATEN.format("conv2d|convolution|_convolution|mkldnn_convolution")),
    *category_rules("batch_norm", r"BatchNorm|batch_norm"),
    *category_rules("concat_copy", ATEN.format("cat"), r"CatBackward|ViewBackward|TBackward"),
    *category_rules("pooling", r"Pool2D|pool2d|MeanBackward", ATEN.format("mean")),
    *category_rules("matmul", r"AddmmBackward", ATEN.format("linear|addmm|mm")),
    *category_rules("elementwise", r"ReluBackward", ATEN.format("relu_?|threshold_backward|sigmoid|ones_like")),
    *category_rules(
        "concat_copy",
        ATEN.format(
            "flatten|view|reshape|t|transpose|unsqueeze|as_strided_?|expand|detach|narrow|slice|select|clone"
            "|contiguous|to|_to_copy|copy_|stack|resolve_conj|resolve_neg"
        ),
        r"(^|/)detach\b",
    ),
    *category_rules("overhead", ATEN.format("empty|empty_like|empty_strided|resize_|item|_local_scalar_dense")),
]
