"""DenseNet-BC in Flax (linen), NHWC, with PyTorch's BatchNorm numerics.

Every layer is named after its canonical prefix (dots become underscores: ``features.denseblock1.denselayer1.norm1``
is ``features_denseblock1_denselayer1_norm1``), so the weight map (:mod:`cxrbench_jax.weights`) is a rename plus
the conv-kernel transpose. The network takes float32 ImageNet-normalised NHWC input; :func:`normalise` runs on the
device in front of it, inside the jitted functions, so uint8 crosses to the device.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cxrbench.backend import IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES, canonical

#: PyTorch's BatchNorm momentum: running = (1 - 0.1) * running + 0.1 * batch.
BN_MOMENTUM = 0.1

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


def module_name(prefix: str) -> str:
    """The Flax module name of a canonical layer prefix."""
    return prefix.replace(".", "_")


def normalise(images: jax.Array) -> jax.Array:
    """uint8 gray (N, S, S) -> float32 ImageNet-normalised (N, S, S, 3), in the order of checks.onnx.normalise."""
    gray = images.astype(jnp.float32)[..., None] / jnp.float32(255.0)
    return (gray - _MEAN) / _STD


class TorchBatchNorm(nn.Module):
    """BatchNorm as in PyTorch: epsilon 1e-5, momentum 0.1, and the running variance updated with the
    UNBIASED batch variance (Flax's own BatchNorm keeps the biased one and uses the opposite momentum).

    Under ``jit`` with a batch sharded over devices the statistics are reduced over the global batch, so the
    data-parallel step is synchronised BatchNorm without any collective written here. With ``groups`` > 1 the batch
    is cut into that many consecutive parts (one per machine: ``train.batchnorm_sync = "node"``), each normalised
    with its own statistics; the running statistics follow the first part, as rank 0's do in PyTorch.
    """

    features: int
    groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        mean_stat = self.variable("batch_stats", "mean", jnp.zeros, (self.features,), jnp.float32)
        var_stat = self.variable("batch_stats", "var", jnp.ones, (self.features,), jnp.float32)
        if train and self.groups > 1:
            return self._per_group(x, scale, bias, mean_stat, var_stat)
        if train:
            mean = x.mean(axis=(0, 1, 2))
            var = jnp.square(x - mean).mean(axis=(0, 1, 2))
            count = x.size // self.features
            if not self.is_initializing():
                unbiased = var * (count / max(count - 1, 1))
                mean_stat.value = (1 - BN_MOMENTUM) * mean_stat.value + BN_MOMENTUM * mean
                var_stat.value = (1 - BN_MOMENTUM) * var_stat.value + BN_MOMENTUM * unbiased
        else:
            mean, var = mean_stat.value, var_stat.value
        return (x - mean) * (scale * jax.lax.rsqrt(var + canonical.BN_EPSILON)) + bias

    def _per_group(self, x, scale, bias, mean_stat, var_stat) -> jax.Array:
        parts = x.reshape(self.groups, -1, *x.shape[1:])
        mean = parts.mean(axis=(1, 2, 3), keepdims=True)
        var = jnp.square(parts - mean).mean(axis=(1, 2, 3), keepdims=True)
        count = parts[0].size // self.features
        if not self.is_initializing():
            unbiased = var[0].reshape(-1) * (count / max(count - 1, 1))
            mean_stat.value = (1 - BN_MOMENTUM) * mean_stat.value + BN_MOMENTUM * mean[0].reshape(-1)
            var_stat.value = (1 - BN_MOMENTUM) * var_stat.value + BN_MOMENTUM * unbiased
        out = (parts - mean) * (scale * jax.lax.rsqrt(var + canonical.BN_EPSILON)) + bias
        return out.reshape(x.shape)


def conv(features: int, kernel: int, name: str, stride: int = 1, pad: int = 0) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=[(pad, pad), (pad, pad)],
        use_bias=False,
        name=name,
    )


class DenseNet(nn.Module):
    """torchvision's DenseNet-BC (growth 32, bottleneck 4, 64 initial features) for any block configuration."""

    block_config: tuple[int, ...]
    #: Groups BatchNorm reduces within while training (:class:`TorchBatchNorm`); the weights do not depend on it.
    bn_groups: int = 1

    def bn_relu(self, x: jax.Array, prefix: str, train: bool) -> jax.Array:
        return nn.relu(TorchBatchNorm(x.shape[-1], self.bn_groups, name=module_name(prefix))(x, train))

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """The final feature map after the last BatchNorm *and* ReLU (what CAM multiplies)."""
        x = conv(canonical.INIT_FEATURES, 7, "features_conv0", stride=2, pad=3)(x)
        x = self.bn_relu(x, "features.norm0", train)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # -inf padding never wins
        channels = canonical.INIT_FEATURES
        for b, layers in enumerate(self.block_config, start=1):
            for k in range(1, layers + 1):
                prefix = f"features.denseblock{b}.denselayer{k}"
                y = self.bn_relu(x, f"{prefix}.norm1", train)
                y = conv(canonical.BN_SIZE * canonical.GROWTH_RATE, 1, module_name(f"{prefix}.conv1"))(y)
                y = self.bn_relu(y, f"{prefix}.norm2", train)
                y = conv(canonical.GROWTH_RATE, 3, module_name(f"{prefix}.conv2"), pad=1)(y)
                x = jnp.concatenate([x, y], axis=-1)
            channels += layers * canonical.GROWTH_RATE
            if b != len(self.block_config):
                channels //= 2
                y = self.bn_relu(x, f"features.transition{b}.norm", train)
                x = nn.avg_pool(conv(channels, 1, f"features_transition{b}_conv")(y), (2, 2), strides=(2, 2))
        return self.bn_relu(x, "features.norm5", train)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, with_features: bool = False):
        """Logits ``(N, 14)``; with ``with_features`` also the final feature map ``(N, h, w, K)`` of the same pass
        (Flax allows one compact method, so CAM asks the same method for more)."""
        features = self.features(x, train)
        logits = nn.Dense(NUM_CLASSES, name="classifier")(features.mean(axis=(1, 2)))
        return (features, logits) if with_features else logits
