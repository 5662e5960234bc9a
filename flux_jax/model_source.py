"""Where a model_path points: a local model directory, or a Hugging Face hub id to download.

Only `org/name` (exactly one slash, HF's repo-id characters) is ever sent to the hub; `./x`,
`../x`, `/abs`, `~/x`, `x` and `a/b/c` are local paths, and one that does not exist is reported
as such, with the current directory, instead of as a hub lookup that failed. An `org/name` whose
`org/` is a local directory is a typo in a local path, not a hub id.

The hub lookup has a timeout: huggingface_hub's HTTP client waits forever by default, so an
endpoint that accepts the connection and never answers would hang the run before it starts. The
repo is first looked up with `HF_HUB_ETAG_TIMEOUT` (huggingface_hub's own setting, default 10 s),
then downloaded (each file request under the same timeout). Without an answer, a copy already in
the local hub cache is used, as huggingface_hub does offline.
"""

from __future__ import annotations

import difflib
import os
import re

from flux_jax.config import expand_path

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*"]

# HF repo ids: letters, digits, "-", "_", "."; "-" and "." neither start nor end a part; no "--"
# or ".."; at most 96 characters (huggingface_hub.utils.validate_repo_id).
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(f"{_REPO_PART}/{_REPO_PART}")


def is_hub_id(model_path: str) -> bool:
    """True for `org/name` spellings that the Hugging Face hub accepts as a model id."""
    return (
        bool(_HUB_ID.fullmatch(model_path))
        and "--" not in model_path
        and ".." not in model_path
        and len(model_path) <= 96
    )


def resolve_model_dir(model_path: str, setting: str = "model_path") -> str:
    """A local directory holding the HF checkpoint named by model_path (a dir or a hub id).

    `setting` is the config key the path came from, for the error messages.
    """
    local = expand_path(model_path)
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise NotADirectoryError(f"{setting} {model_path!r} is a file; expected a model directory")
    where = _no_local_dir(setting, model_path, local)
    if not is_hub_id(model_path):
        raise FileNotFoundError(where + _hub_id_hint(model_path))
    org = model_path.split("/")[0]
    if os.path.isdir(org):
        raise FileNotFoundError(
            where
            + f" ({os.path.abspath(org)} is a local directory, so this is read as a local path, "
            "not a hub id; run from another directory to use the hub model of that name)"
        )
    return download_from_hub(model_path, where=where)


def _no_local_dir(setting: str, model_path: str, local: str) -> str:
    """`model_path ...: no such directory ...`, with the current directory and a close name."""
    absolute = os.path.abspath(local)
    message = f"{setting} {model_path!r}: no such directory {absolute}"
    if not os.path.isabs(local):
        message += f" (relative paths start at the current directory, {os.getcwd()})"
    parent, name = os.path.split(absolute)
    if os.path.isdir(parent):
        close = difflib.get_close_matches(name, os.listdir(parent), n=1)
        if close:
            message += f"; did you mean {os.path.join(parent, close[0])}?"
    return message


def _hub_id_hint(model_path: str) -> str:
    if model_path.count("/") == 1 and not model_path.startswith((".", "/", "~")):
        return " (and not a valid Hugging Face hub id: letters, digits, '-', '_', '.' only)"
    return "; hub ids have the form 'org/name', like 'Qwen/Qwen3-8B'"


def download_from_hub(repo_id: str, *, where: str = "") -> str:
    """The local snapshot directory of hub model `repo_id` (config, safetensors, tokenizer).

    Raises FileNotFoundError naming `repo_id`, the endpoint and the cause (no answer within the
    timeout, no such model, no network and nothing cached). `where` prefixes the message (why a
    local path was not used).
    """
    from huggingface_hub import HfApi, constants, snapshot_download

    timeout = float(constants.HF_HUB_ETAG_TIMEOUT)
    prefix = f"{where}, and" if where else f"model_path {repo_id!r}:"
    try:
        HfApi().repo_info(repo_id, timeout=timeout)
    except Exception as lookup_error:  # no answer, no network, offline mode, not found, gated
        try:  # what snapshot_download does without the hub: a copy in the local cache
            return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
        except Exception:
            pass
        raise FileNotFoundError(
            f"{prefix} {_hub_failure(repo_id, lookup_error, timeout, constants.ENDPOINT)}. "
            "Or download the model elsewhere and pass its local directory."
        ) from lookup_error
    # The hub answered; snapshot_download looks the repo up again (without a timeout of its own:
    # huggingface_hub offers none for that call) and downloads each file under `etag_timeout`.
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, etag_timeout=timeout)
    except Exception as e:
        raise FileNotFoundError(
            f"{prefix} downloading hub model {repo_id!r} from {constants.ENDPOINT} failed "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from e


def _hub_failure(repo_id: str, error: Exception, timeout: float, endpoint: str) -> str:
    """Why hub model `repo_id` could not be looked up, and what to do about it."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if _timed_out(error):
        return (
            f"the Hugging Face hub at {endpoint} did not answer the lookup of {repo_id!r} within "
            f"{timeout:g} s, and no copy is in the local hub cache. Check your network and "
            "HF_ENDPOINT, or set HF_HUB_ETAG_TIMEOUT (seconds) to wait longer"
        )
    if isinstance(error, GatedRepoError):
        return (
            f"hub model {repo_id!r} is gated: accept its terms on the hub and log in "
            "(`hf auth login` or HF_TOKEN)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"the Hugging Face hub at {endpoint} has no model {repo_id!r} (or it is private: log "
            "in with `hf auth login` or HF_TOKEN)"
        )
    return (
        f"hub model {repo_id!r} could not be looked up at {endpoint} and is not in the local hub "
        f"cache ({type(error).__name__}: {_first_line(error)})"
    )


def _timed_out(error: BaseException | None) -> bool:
    """Whether a timeout caused `error`. httpx, httpx2 and requests name their timeout errors
    `...Timeout...` and none derives from TimeoutError, so the class names are what they share."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, TimeoutError):
            return True
        if any("Timeout" in cls.__name__ for cls in type(error).__mro__):
            return True
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
