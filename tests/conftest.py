"""Test session set-up: 8 fake CPU devices for sharding tests and strict JAX semantics."""

import os
import tempfile

# Must happen before jax is imported anywhere in the session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The persistent compilation cache (on by default, under $XDG_CACHE_HOME) goes to a directory of
# this session, also for the subprocesses tests start: tests leave nothing in the user's home.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="flux_jax_test_cache_")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
