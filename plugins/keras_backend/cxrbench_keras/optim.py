"""Adam with torch.optim.Adam's exact update, so both backends take the same steps.

Keras' Adam adds epsilon to sqrt(v) before bias correction (an effective epsilon of
eps / sqrt(1 - beta2^t), 31.6x larger at step 1) and applies weight decay decoupled (AdamW);
torch.optim.Adam adds epsilon after bias correction and adds ``weight_decay * w`` to the gradient.
"""

from __future__ import annotations

import keras
from keras import ops


class TorchAdam(keras.optimizers.Adam):
    def __init__(self, learning_rate, beta_1, beta_2, epsilon, l2: float = 0.0, **kwargs):
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, **kwargs)
        self.l2 = float(l2)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        if self.l2:
            gradient = gradient + self.l2 * variable
        step = ops.cast(self.iterations + 1, dtype)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign_add(m, (gradient - m) * (1 - self.beta_1))
        self.assign_add(v, (ops.square(gradient) - v) * (1 - self.beta_2))
        m_correction = 1 - ops.power(ops.cast(self.beta_1, dtype), step)
        v_correction = 1 - ops.power(ops.cast(self.beta_2, dtype), step)
        denominator = ops.sqrt(v) / ops.sqrt(v_correction) + self.epsilon
        self.assign_sub(variable, (lr / m_correction) * m / denominator)


def make_optimizer(settings):
    """The recipe's optimizer (learning rate set per epoch); a loss-scaling wrapper for fp16."""
    train = settings.train
    optimizer = TorchAdam(
        train.learning_rate, train.adam_beta1, train.adam_beta2, train.adam_epsilon, l2=train.weight_decay
    )
    if settings.numerics.precision == "fp16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
