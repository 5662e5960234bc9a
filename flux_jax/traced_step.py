"""The traced train step, kept on disk beside the compilation cache: a repeated run skips tracing.

JAX's persistent compilation cache (flux_jax/compile_cache.py) skips XLA's compile of the step,
but finding the executable in it still needs the program: tracing and lowering the step, which
takes longer than loading the executable (on the 2-core CPU, ~0.7 s of a 1.6 s warm start-up for
a 40M model). A repeated run with the same code, settings and shapes traces the same program, so
this keeps it, serialised with `jax.export`, under a key made of everything the trace depends on:
the flux_jax sources, the jax / jaxlib / flax / optax versions and the jax flags that change
programs, the run's config, the model's config, the DPO settings, the devices, and the arguments'
tree, shapes, dtypes and shardings. A hit deserialises the program and runs it (its executable
then comes from the compilation cache); a miss traces as usual and writes the program for the
next run. Either way it is one program: the numbers are the same.

A program that cannot be exported or read back (a jax without serialisation, a damaged file) is
traced as usual, with one warning naming the cause; the run goes on unchanged. Off with
`compile_cache.reuse_traced_step: false` or with the compilation cache itself.

The programs take the arguments' leaves flat and return the new state's leaves and the metrics
dict, so the serialised form holds only built-in containers (the optimiser's NamedTuples and the
model's nested dicts are rebuilt from the tree of the call's own arguments).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger(__name__)

SUBDIR = "flux_jax_steps"
# jax flags that change the traced program (the compilation cache keys the rest: XLA flags, ...).
PROGRAM_FLAGS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_numpy_dtype_promotion",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
)


@functools.cache
def code_fingerprint() -> str:
    """sha256 of every flux_jax source file and the versions of the libraries that trace."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    for package in ("jax", "jaxlib", "flax", "optax"):
        digest.update(f"{package}={importlib.metadata.version(package)}".encode())
    return digest.hexdigest()


def loss_fingerprint() -> str:
    """sha256 of the registered losses' code: a loss registered at run time (register_loss in a
    user's script) is not among the flux_jax sources, and its code can change under one name."""
    from flux_jax.losses.registry import LOSSES

    digest = hashlib.sha256()
    for name, entry in sorted(LOSSES.items()):
        code = getattr(entry.losses, "__code__", None)
        digest.update(f"{name}:{getattr(entry.losses, '__qualname__', entry.losses)!r}".encode())
        if code is not None:
            digest.update(code.co_code + repr(code.co_consts).encode())
    return digest.hexdigest()


def _signature(args: tuple[Any, ...]) -> str:
    """The arguments' tree and each leaf's shape, dtype and sharding."""
    leaves, treedef = jax.tree.flatten(args)
    described = [(tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None))) for x in leaves]
    return f"{treedef}|{described}"


def _key(context: dict[str, Any], args: tuple[Any, ...]) -> str:
    devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
    flags = {name: str(getattr(jax.config, name, None)) for name in PROGRAM_FLAGS}
    text = json.dumps(
        {
            "code": code_fingerprint(),
            "losses": loss_fingerprint(),
            "context": context,
            "devices": devices,
            "processes": jax.process_count(),
            "flags": flags,
            "args": _signature(args),
        },
        sort_keys=True,
        default=repr,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:40]


class ReusedStep:
    """`step(state, batch, frozen) -> (state, metrics)` as the jitted `step` computes it, its
    program read from `directory` when an earlier run with the same key left it there.

    `context`: what the trace depends on besides the code and the arguments (the config dict,
    the model config, the settings), JSON-able or repr-able. `state_shardings`: the output
    state's shardings (as the jitted step's out_shardings), or None. The first argument (the
    state) is donated, as by the jitted step.
    """

    def __init__(
        self,
        step: Callable[..., Any],
        directory: str,
        context: dict[str, Any],
        state_shardings: Any | None,
    ):
        self.step = step
        self.directory = Path(directory)
        self.context = context
        self.state_shardings = state_shardings
        self.loaded = 0  # programs read from disk in this process (tests, logs)
        self.written = 0
        self._runners: dict[str, Callable[..., Any]] = {}

    def __call__(self, state: Any, batch: Any, frozen: Any) -> Any:
        args = (state, batch, frozen)
        signature = _signature(args)
        runner = self._runners.get(signature)
        if runner is None:
            runner = self._runners[signature] = self._runner(args)
        return runner(args)

    def _runner(self, args: tuple[Any, ...]) -> Callable[..., Any]:
        leaves, treedef = jax.tree.flatten(args)
        state_def = jax.tree.structure(args[0])
        num_state = state_def.num_leaves
        path = self.directory / f"{_key(self.context, args)}.jaxexport"
        exported = self._read(path) or self._export(path, leaves, treedef, state_def)
        if exported is None:
            return lambda a: self.step(*a)
        call = jax.jit(exported.call, donate_argnums=tuple(range(num_state)))

        def run(a: tuple[Any, ...]) -> Any:
            state_leaves, metrics = call(*jax.tree.leaves(a))
            return jax.tree.unflatten(state_def, state_leaves), metrics

        return run

    def _read(self, path: Path) -> Any | None:
        if not path.exists():
            return None
        try:
            exported = jax.export.deserialize(bytearray(path.read_bytes()))
        except Exception as err:  # noqa: BLE001 (a cache: any failure means trace again)
            log.warning("traced step %s could not be read (%s); tracing it again", path, err)
            return None
        self.loaded += 1
        log.info("train step program read from %s (no tracing)", path)
        return exported

    def _export(self, path: Path, leaves: list[Any], treedef: Any, state_def: Any) -> Any | None:
        def flat_step(*flat: Any) -> Any:
            new_state, metrics = self.step(*jax.tree.unflatten(treedef, flat))
            return jax.tree.leaves(new_state), metrics

        out_shardings = None
        if self.state_shardings is not None:
            out_shardings = (jax.tree.leaves(self.state_shardings), None)
        avals = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in leaves]
        try:
            exported = jax.export.export(jax.jit(flat_step, out_shardings=out_shardings))(*avals)
            blob = exported.serialize()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(blob)
            os.replace(tmp, path)  # atomic: processes writing the same program do not collide
        except Exception as err:  # noqa: BLE001 (a cache: any failure means trace as usual)
            log.warning("the train step could not be kept for the next run (%s)", err)
            return None
        self.written += 1
        return exported


def reuse_traced_step(
    step: Callable[..., Any],
    *,
    enabled: bool,
    context: dict[str, Any],
    state_shardings: Any | None,
) -> Callable[..., Any]:
    """`step` itself, or a ReusedStep in the compilation cache's directory (when the cache is on
    and `enabled`)."""
    cache_dir = jax.config.jax_compilation_cache_dir
    if not (enabled and jax.config.jax_enable_compilation_cache and cache_dir):
        return step
    return ReusedStep(step, os.path.join(cache_dir, SUBDIR), context, state_shardings)
