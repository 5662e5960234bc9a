"""JAX's persistent compilation cache: a run reuses the executables an earlier run compiled.

A resumed or repeated run on the same machine (same jax, same XLA flags, same shapes) then loads
each train-step executable from disk instead of compiling it again. The cache directory is
`compile_cache.dir`, by default $XDG_CACHE_HOME/flux_jax/xla (~/.cache/flux_jax/xla); only
compilations that took at least `compile_cache.min_compile_time_s` are written.

JAX reads its cache settings when it first compiles with a directory set, once per process.
`enable_compile_cache` is therefore called in FluxTrainer's constructor, before the model is
built. A directory the user already gave JAX (JAX_COMPILATION_CACHE_DIR or jax.config) wins over
the config's default; an explicit `compile_cache.dir` replaces it.

The directory is trusted code: JAX loads executables from it. Keep it private to the user.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/flux_jax/xla, or ~/.cache/flux_jax/xla."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flux_jax" / "xla"


def enable_compile_cache(
    directory: str = "", *, min_compile_time_s: float = 0.0, enabled: bool = True
) -> str | None:
    """Points JAX's persistent compilation cache at `directory` ('' = the user's JAX setting,
    else `default_cache_dir()`); returns the directory in use, or None when off.

    `enabled=False` switches the cache off for the rest of the process.
    """
    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    current = jax.config.jax_compilation_cache_dir
    path = directory or current or str(default_cache_dir())
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"compile_cache.dir: cannot create the compilation cache directory {path!r} ({err}); "
            "set compile_cache.dir to a writable directory, or compile_cache.enabled: false"
        ) from err
    if current and current != path:
        # JAX keeps the directory it initialised with; start it afresh on the new one.
        compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    log.info("persistent compilation cache: %s (min compile time %.1f s)", path, min_compile_time_s)
    return path


def cache_entries(directory: str | os.PathLike) -> int:
    """Number of executables stored in a cache directory (0 if it does not exist)."""
    path = Path(directory)
    if not path.is_dir():
        return 0
    return sum(1 for entry in path.iterdir() if entry.name.endswith("-cache"))
