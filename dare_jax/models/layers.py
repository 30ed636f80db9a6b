"""Small layers with the official (PyTorch) semantics and initialisation.

Official initialisation: every parameter whose name is not a bias ~ Normal(0, init_std)
(BatchNorm scale and PReLU slope included); biases keep PyTorch's defaults (Linear bias
~ Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), BatchNorm bias 0).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch BatchNorm1d defaults.
BATCHNORM_EPS = 1e-5
BATCHNORM_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch


def normal_init(std: float):
    """Normal(0, std) initialiser."""
    return lambda key, shape, dtype=jnp.float32: std * jax.random.normal(key, shape, dtype)


def torch_linear_bias_init(fan_in: int):
    """PyTorch's default Linear bias: Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


class Linear(nn.Module):
    """y = x @ kernel (+ bias); kernel `[in, out]` (the transpose of PyTorch's weight)."""

    features: int
    use_bias: bool = True
    init_std: float = 0.01

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        y = jnp.dot(x, self.param("kernel", normal_init(self.init_std), (fan_in, self.features)))
        if self.use_bias:
            y = y + self.param("bias", torch_linear_bias_init(fan_in), (self.features,))
        return y


class PReLU(nn.Module):
    """PReLU with ONE learnable slope shared by all channels (PyTorch num_parameters=1)."""

    init_std: float = 0.01

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        slope = self.param("slope", normal_init(self.init_std), (1,))
        return jnp.where(x >= 0, x, slope[0] * x)


def _mlp(x, hidden, features: int, use_bias: bool, init_std: float) -> jax.Array:
    """Linear + PReLU per hidden size, then Linear(features); submodules dense_i, prelu_i."""
    for i, width in enumerate(hidden):
        x = Linear(width, use_bias, init_std, name=f"dense_{i}")(x)
        x = PReLU(init_std, name=f"prelu_{i}")(x)
    return Linear(features, use_bias, init_std, name=f"dense_{len(hidden)}")(x)


class BatchNorm1d(nn.Module):
    """PyTorch BatchNorm1d over `[B, F]`: eps 1e-5, momentum 0.1 (PyTorch convention).
    Training normalises with the batch mean and biased variance and updates the running
    statistics (when `batch_stats` is mutable) with the UNBIASED variance, as PyTorch does.
    Evaluation uses the running statistics unless `use_batch_stats_at_eval` (the official
    code never switches to evaluation mode). `mask` `[B]` (None: all): the rows the batch
    statistics are taken over (not a padded batch's filler rows); all rows are normalised."""

    init_std: float = 0.01
    use_batch_stats_at_eval: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", normal_init(self.init_std), (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if train or self.use_batch_stats_at_eval:
            if mask is None:
                n = x.shape[0]
                mean = jnp.mean(x, axis=0)
                var = jnp.mean(jnp.square(x - mean), axis=0)
                bessel = n / max(n - 1, 1)
            else:
                weight = jnp.asarray(mask, x.dtype)[:, None]
                n = jnp.maximum(jnp.sum(weight), 1)
                mean = jnp.sum(weight * x, axis=0) / n
                var = jnp.sum(weight * jnp.square(x - mean), axis=0) / n
                bessel = n / jnp.maximum(n - 1, 1)
            if train and self.is_mutable_collection("batch_stats") and not self.is_initializing():
                m = BATCHNORM_MOMENTUM
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * (var * bessel)
        else:
            mean, var = running_mean.value, running_var.value
        return (x - mean) * jax.lax.rsqrt(var + BATCHNORM_EPS) * scale + bias


class MLPHead(nn.Module):
    """BatchNorm (`batch_norm`), then Linear + PReLU per hidden size, then Linear(2): logits
    `[B, 2]`. `mask` `[B]`: the rows BatchNorm takes batch statistics over."""

    hidden: tuple[int, ...]
    init_std: float = 0.01
    use_batch_stats_at_eval: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        norm = BatchNorm1d(self.init_std, self.use_batch_stats_at_eval, name="batch_norm")
        return _mlp(norm(x, train, mask), self.hidden, 2, True, self.init_std)


class ProjectionMLP(nn.Module):
    """Linear map, or Linear-PReLU-...-Linear when `hidden` is non-empty (dense_i / prelu_i)."""

    features: int
    hidden: tuple[int, ...] = ()
    use_bias: bool = True
    init_std: float = 0.01

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _mlp(x, self.hidden, self.features, self.use_bias, self.init_std)
