"""Test configuration: 8 fake CPU devices and strict dtype promotion.

This runs before any test module imports JAX computations, so every test sees
`len(jax.devices()) == 8` and sharding code is exercised on every machine.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU-only

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
# Like equinox's tests: implicit promotion between e.g. f32 and bf16 is an error,
# so dtype bugs surface as exceptions instead of silent up-casts.
jax.config.update("jax_numpy_dtype_promotion", "strict")
