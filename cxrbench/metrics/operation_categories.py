"""The one table that maps each framework's operation names to categories every backend shares.

A profile cuts a training step into these categories, whatever the framework, so two backends can be compared
side by side ("keras spends 9 ms more per step in batch norm"). A category is decided per *path*: the names of the
spans enclosing an operation on its thread, outermost first, then the operation's own scope and name, joined with
``/`` (``cxrbench.profile/Optimizer.step#Adam.step/aten::add_`` in PyTorch,
``StatefulPartitionedCall/gradient_tape/densenet/conv2_block1_0_bn/moments/Mean/Mean`` in TensorFlow). The rules are
regular expressions searched in the path, in order; the first that matches decides, and a path no rule matches is
``other`` and is listed by name, so a gap in the table shows instead of hiding.

The order of the rules: the core's input annotation first, then each plugin's rules for its framework's own names
(``cxrbench_operation_rules``: TensorFlow's layer scopes, PyTorch's autograd nodes, XLA's ``op_name`` paths), then
:data:`GENERIC_RULES`, which know the operation names most frameworks share. Plugin rules come before the generic
ones because they know context the generic ones cannot (a ``Mean`` inside ``conv2_block1_0_bn`` is batch norm).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from cxrbench.backend.profiling import INPUT_REGION
from cxrbench.errors import CxrError


@dataclass(frozen=True)
class Category:
    key: str
    label: str
    description: str


#: Every category, in the order tables and stacked bars show them.
CATEGORIES: tuple[Category, ...] = (
    Category("conv_forward", "convolution (forward)", "convolutions of the forward pass"),
    Category("conv_backward", "convolution (backward)", "gradients of the convolutions (input and weights)"),
    Category("batch_norm", "batch norm", "BatchNorm statistics, normalisation and its gradient"),
    Category(
        "concat_copy",
        "concatenation and copies",
        "DenseNet's concatenations and their gradients, copies, transposes and layout changes",
    ),
    Category("elementwise", "element-wise and activations", "ReLU and other element-wise operations, forward and back"),
    Category("pooling", "pooling", "max, average and global average pooling, forward and back"),
    Category("matmul", "matmul / linear", "the classifier's matrix products and bias"),
    Category("loss", "loss", "binary cross-entropy on the logits and its gradient"),
    Category("optimizer", "optimizer update", "Adam's update of every weight"),
    Category("input", "input pipeline (host)", "waiting for the next batch, as the training loop sees it"),
    Category(
        "overhead",
        "framework/host overhead",
        "time no operation ran on the device: the framework's own work, Python, launches and synchronisation",
    ),
    Category("other", "other (unmapped)", "operations no rule knows; listed by name"),
)
CATEGORY_KEYS = tuple(c.key for c in CATEGORIES)
LABELS = {c.key: c.label for c in CATEGORIES}
#: Categories of time with no operation behind it (the rest are the model's operations).
NOT_OPERATIONS = ("input", "overhead")


@dataclass(frozen=True)
class OperationRule:
    """A regular expression (Python ``re`` syntax, searched in an operation's path) and the category it decides."""

    category: str
    pattern: str

    def __post_init__(self) -> None:
        if self.category not in CATEGORY_KEYS:
            raise CxrError(
                f"operation rule {self.pattern!r}: unknown category {self.category!r} "
                f"(known: {', '.join(CATEGORY_KEYS)})"
            )
        try:
            re.compile(self.pattern)
        except re.error as exc:
            message = f"operation rule {self.pattern!r} ({self.category}): not a regular expression: {exc}"
            raise CxrError(message) from None

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)


def category_rules(category: str, *patterns: str) -> list[OperationRule]:
    """Several patterns of one category (how plugins and the tables below write them)."""
    return [OperationRule(category, pattern) for pattern in patterns]


#: The core's own annotation around each wait for a batch (:data:`cxrbench.backend.profiling.INPUT_REGION`).
INPUT_RULES = category_rules("input", rf"(^|/){re.escape(INPUT_REGION)}(/|$)")

#: Names most frameworks share (ONNX-like operator names, in any case): the fallback after the plugins' rules. The
#: order matters: the optimizer and the loss claim everything inside them, and backward convolution comes before
#: forward.
GENERIC_RULES: tuple[OperationRule, ...] = (
    *category_rules("optimizer", r"(?i)optimi[sz]er|\badam|apply_?gradients?|\bsgd\b"),
    *category_rules("loss", r"(?i)cross_?entropy|logistic_loss|\bbce"),
    *category_rules(
        "conv_backward", r"(?i)conv(?!ert)\w*(backward|backprop|_?grad)", r"(?i)(backward|grad)\w*conv(?!ert)"
    ),
    *category_rules("conv_forward", r"(?i)conv(?!ert)"),
    *category_rules("batch_norm", r"(?i)batch_?norm"),
    *category_rules("pooling", r"(?i)pool|reduce[-_]window"),
    *category_rules("matmul", r"(?i)matmul|gemm|\bdot\b|\bmm\b|addmm|linear|bias_?add"),
    *category_rules(
        "concat_copy", r"(?i)concat|\bcat\b|copy|memcpy|transpose(?!\()|reshape|slice|\bpad\b|contiguous|reorder"
    ),
    *category_rules(
        "elementwise",
        r"(?i)relu|threshold|sigmoid|tanh|\b(add|sub|mul|div|neg|exp|log|sqrt|rsqrt|pow|square|maximum|minimum)",
        r"(?i)\b(select|where|cast|convert|fill|broadcast|clamp)",
    ),
)


class Classifier:
    """Paths -> categories with an ordered rule list (the input annotation, the plugins' rules, the generic ones);
    each distinct path is decided once."""

    def __init__(self, plugin_rules: Iterable[OperationRule] = ()):
        self.rules: tuple[OperationRule, ...] = (*INPUT_RULES, *plugin_rules, *GENERIC_RULES)
        self._seen: dict[str, str] = {}

    def category(self, path: str) -> str:
        found = self._seen.get(path)
        if found is None:
            found = next((rule.category for rule in self.rules if rule.regex.search(path)), "other")
            self._seen[path] = found
        return found


def collect_rules(answers: Sequence[Iterable[OperationRule] | None]) -> list[OperationRule]:
    """Every plugin's ``cxrbench_operation_rules`` answer, in the order pluggy gives them, checked."""
    found: list[OperationRule] = []
    for answer in answers:
        for rule in answer or ():
            if not isinstance(rule, OperationRule):
                raise CxrError(f"cxrbench_operation_rules returned {rule!r}: expected OperationRule objects")
            found.append(rule)
    return found
