"""User errors around the model and its paths get one clear message, not silence or a hang.

RoPE settings we do not compute (rope_scaling beside rope_parameters), damaged safetensors files,
`~` / `$VAR` in path settings, local paths that do not exist (never sent to the hub), a hub
endpoint that never answers, and generation lengths beyond the model's positions or memory.
No test touches the network: the hub is a socket on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import jax
import numpy as np
import pytest
from flax import nnx

import flux_jax
from flux_jax import model_source
from flux_jax.config import ConfigError, FluxConfig, expand_path
from flux_jax.generation import budget, generate, kv_cache
from flux_jax.hf_io import CheckpointError, save_pretrained
from flux_jax.models.qwen.config import QwenConfig, UnsupportedConfigError
from flux_jax.models.qwen.model import build_model
from flux_jax.sharding import make_mesh
from tests.train_fixtures import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------
# 1. RoPE settings: read as transformers 5 reads them, or refused


def _hf(**overrides):
    base = dict(
        model_type="qwen3",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    return {**base, **overrides}


DEFAULT_ROPE = {"rope_theta": 1e6, "rope_type": "default"}

ACCEPTED = {
    "5.x rope_parameters": _hf(rope_parameters=DEFAULT_ROPE),
    "5.x with rope_scaling null": _hf(rope_parameters=DEFAULT_ROPE, rope_scaling=None),
    "5.x with an identical rope_scaling": _hf(
        rope_parameters=DEFAULT_ROPE, rope_scaling=dict(DEFAULT_ROPE)
    ),
    "4.x rope_theta": _hf(rope_theta=5e5),
    "4.x rope_scaling null": _hf(rope_theta=5e5, rope_scaling=None),
    "4.x rope_scaling type default": _hf(rope_theta=5e5, rope_scaling={"type": "default"}),
}

REFUSED = {
    "yarn rope_scaling beside rope_parameters": (
        _hf(
            rope_parameters=DEFAULT_ROPE,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
            },
        ),
        "rope_scaling=.* beside rope_parameters",
    ),
    # transformers takes this rope_scaling and rope_theta 10000: not what rope_parameters says.
    "default rope_scaling beside rope_parameters": (
        _hf(rope_parameters=DEFAULT_ROPE, rope_scaling={"rope_type": "default"}),
        "beside rope_parameters",
    ),
    "yarn rope_parameters": (
        _hf(rope_parameters={"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}),
        "rope_parameters rope_type 'yarn'",
    ),
    "4.x linear rope_scaling": (
        _hf(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0}),
        "rope_scaling rope_type 'linear'",
    ),
    "per-layer-type rope_parameters": (
        _hf(rope_parameters={"full_attention": DEFAULT_ROPE}),
        "per layer type",
    ),
    "partial rotary": (
        _hf(rope_parameters={**DEFAULT_ROPE, "partial_rotary_factor": 0.5}),
        "partial_rotary_factor",
    ),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_rope_settings_match_transformers(name):
    import transformers

    hf = ACCEPTED[name]
    ours = QwenConfig.from_hf_config(hf)
    theirs = transformers.Qwen3Config.from_dict(dict(hf)).rope_parameters
    assert theirs.get("rope_type", "default") == "default"
    assert ours.rope_theta == theirs["rope_theta"]


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_rope_settings_are_refused(name):
    hf, message = REFUSED[name]
    with pytest.raises(UnsupportedConfigError, match=message):
        QwenConfig.from_hf_config(hf)


def test_rope_scaling_beside_rope_parameters_names_the_config_file(tmp_path):
    hf, _ = REFUSED["yarn rope_scaling beside rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UnsupportedConfigError) as error:
        QwenConfig.from_pretrained_dir(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value)
    assert "'yarn'" in str(error.value) and "remove rope_scaling" in str(error.value)


# ----------------------------------------------------------------------------------------------
# 2. Damaged safetensors files name the file and what is wrong


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(TINY)


def _with_config(model, cfg: QwenConfig):
    """`model`'s parameters under another config of the same shapes (no new random init)."""
    graphdef, _ = nnx.split(build_model(cfg, abstract=True))
    return nnx.merge(graphdef, nnx.state(model))


@pytest.fixture(scope="module")
def saved_tiny(tiny_model, tmp_path_factory):
    """A saved tiny model, once as one file and once as three shards with an index."""
    single = save_pretrained(tiny_model, tmp_path_factory.mktemp("single"))
    sharded = save_pretrained(tiny_model, tmp_path_factory.mktemp("sharded"), max_shard_size=40_000)
    return single, sharded


def _copy(src: str, dst) -> str:
    import shutil

    return shutil.copytree(src, dst)


def _cut(path: str, keep: int) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:keep])


def test_truncated_safetensors_names_the_file_and_the_missing_bytes(saved_tiny, tmp_path):
    model_dir = _copy(saved_tiny[0], tmp_path / "m")
    file = os.path.join(model_dir, "model.safetensors")
    size = os.path.getsize(file)
    _cut(file, size // 2)
    with pytest.raises(CheckpointError) as error:
        flux_jax.load_pretrained(model_dir)
    message = str(error.value)
    assert file in message and "truncated" in message
    assert f"describes {size} bytes, the file has {size // 2}" in message


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "too short for a safetensors header"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{", "truncated, or not a safetensors file"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "git lfs pull"),
    ],
)
def test_non_safetensors_content_is_described(saved_tiny, tmp_path, content, expected):
    model_dir = _copy(saved_tiny[0], tmp_path / "m")
    with open(os.path.join(model_dir, "model.safetensors"), "wb") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match=expected):
        flux_jax.load_pretrained(model_dir)


def test_truncated_shard_names_its_index_entry(saved_tiny, tmp_path):
    model_dir = _copy(saved_tiny[1], tmp_path / "m")
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    shard = sorted(set(weight_map.values()))[1]
    assert len(set(weight_map.values())) == 3
    _cut(os.path.join(model_dir, shard), -1)
    with pytest.raises(CheckpointError) as error:
        flux_jax.load_pretrained(model_dir)
    message = str(error.value)
    assert os.path.join(model_dir, shard) in message and "1 missing" in message
    assert "model.safetensors.index.json for" in message
    assert any(name in message for name, f in weight_map.items() if f == shard)


def test_damaged_shard_index_names_the_index(saved_tiny, tmp_path):
    model_dir = _copy(saved_tiny[1], tmp_path / "m")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    _cut(index, 20)
    with pytest.raises(CheckpointError, match=f"{index}: invalid JSON"):
        flux_jax.load_pretrained(model_dir)


# ----------------------------------------------------------------------------------------------
# 3. `~` and `$VAR` in every path setting


def test_expand_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RUN", "r1")
    monkeypatch.delenv("FLUX_UNSET_VAR", raising=False)
    assert expand_path("~/x/$RUN/${RUN}.d") == f"{tmp_path}/x/r1/r1.d"
    assert expand_path("a/~/b") == "a/~/b"  # only a leading ~ is a home directory
    assert expand_path("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    with pytest.raises(ValueError, match=r"\$FLUX_UNSET_VAR is not set"):
        expand_path("$FLUX_UNSET_VAR/out")
    with pytest.raises(ValueError, match="no such user"):
        expand_path("~flux_no_such_user_x/out")


PATH_KEYS = ("model_path", "tokenizer_path", "output_dir", "data.train_path", "data.eval_path")


def test_every_path_setting_expands_from_yaml_py_and_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLUX_DATA", "/data")
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(
        "model_path: ~/models/q\ntokenizer_path: ${FLUX_DATA}/tok\noutput_dir: ~/x\n"
        "data:\n  train_path: $FLUX_DATA/train.jsonl\n  eval_path: ~/eval.jsonl\n"
    )
    home = str(tmp_path / "home")
    expected = {
        "model_path": f"{home}/models/q",
        "tokenizer_path": "/data/tok",
        "output_dir": f"{home}/x",
        "data.train_path": "/data/train.jsonl",
        "data.eval_path": f"{home}/eval.jsonl",
    }
    config = FluxConfig.from_yaml(yaml_path)
    assert {k: config[k] for k in PATH_KEYS} == expected

    py_path = tmp_path / "c.py"
    py_path.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.output_dir = '~/x'\n"
        "    c.data = ml_collections.ConfigDict({'train_path': '$FLUX_DATA/train.jsonl'})\n"
        "    return c\n"
    )
    config = FluxConfig.from_file(py_path)
    assert config.output_dir == f"{home}/x" and config.data.train_path == "/data/train.jsonl"

    config = FluxConfig().apply_overrides(
        ["--config.output_dir=~/y", "data.eval_path=${FLUX_DATA}/e.jsonl"]
    )
    assert config.output_dir == f"{home}/y" and config.data.eval_path == "/data/e.jsonl"
    config.output_dir = "$FLUX_DATA/z"
    assert config.output_dir == "/data/z"


def test_unset_variable_in_a_path_setting_names_the_key_and_file(monkeypatch, tmp_path):
    monkeypatch.delenv("FLUX_UNSET_VAR", raising=False)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("output_dir: $FLUX_UNSET_VAR/run\n")
    with pytest.raises(ConfigError) as error:
        FluxConfig.from_yaml(yaml_path)
    assert str(error.value) == (
        f"{yaml_path}: output_dir: environment variable $FLUX_UNSET_VAR is not set "
        "(in '$FLUX_UNSET_VAR/run')"
    )
    with pytest.raises(ConfigError, match=r"data.train_path: environment variable \$FLUX_UNSET"):
        FluxConfig().apply_overrides(["data.train_path=${FLUX_UNSET_VAR}/t.jsonl"])


# ----------------------------------------------------------------------------------------------
# 4. Local paths that do not exist are reported as such, never sent to the hub


@pytest.fixture
def no_hub(monkeypatch):
    """Fails the test if anything tries the hub; records what would have been looked up."""
    asked = []

    def refuse(repo_id, *, where=""):
        asked.append(repo_id)
        raise AssertionError(f"hub lookup of {repo_id!r}")

    monkeypatch.setattr(model_source, "download_from_hub", refuse)
    return asked


@pytest.mark.parametrize("path", ["./x", "../x", "/nonexistent_flux/x", "x", "a/b/c", "~/nope"])
def test_missing_local_paths_are_not_hub_ids(tmp_path, monkeypatch, no_hub, path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as error:
        model_source.resolve_model_dir(path)
    message = str(error.value)
    assert f"model_path {path!r}: no such directory {os.path.abspath(expand_path(path))}" in message
    if not os.path.isabs(expand_path(path)):
        assert f"current directory, {tmp_path}" in message
    assert no_hub == []


def test_typo_under_a_local_directory_is_a_local_path(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny-qwen").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        model_source.resolve_model_dir("models/tiny-qwn")
    message = str(error.value)
    assert f"no such directory {tmp_path}/models/tiny-qwn" in message
    assert f"did you mean {tmp_path}/models/tiny-qwen?" in message
    assert no_hub == []
    assert model_source.resolve_model_dir("models/tiny-qwen") == "models/tiny-qwen"


def test_tilde_model_path_resolves_locally(tmp_path, monkeypatch, no_hub):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    assert model_source.resolve_model_dir("~/m") == str(tmp_path / "m")


def test_only_org_name_forms_are_hub_ids():
    valid = ["Qwen/Qwen3-8B", "org/name", "a_b/c.d-e"]
    invalid = ["x", "./a", ".a/b", "/a/b", "~a/b", "a/b/c", "a/b.", "a--b/c", "a/b..c", "a/b c"]
    assert all(model_source.is_hub_id(p) for p in valid)
    assert not any(model_source.is_hub_id(p) for p in invalid)


def test_org_name_goes_to_the_hub_when_org_is_not_local(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="hub lookup of 'org/name'"):
        model_source.resolve_model_dir("org/name")


class _NotFoundHandler(BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a repository that does not exist."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        body = b'{"error": "Repository not found"}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_unknown_hub_model_says_both_local_and_hub_were_tried(tmp_path, monkeypatch):
    from huggingface_hub import constants

    server = HTTPServer(("127.0.0.1", 0), _NotFoundHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(FileNotFoundError) as error:
            model_source.resolve_model_dir("models/typo")
    finally:
        server.shutdown()
    message = str(error.value)
    assert f"no such directory {tmp_path}/models/typo" in message
    assert f"the Hugging Face hub at {endpoint} has no model 'models/typo'" in message


# ----------------------------------------------------------------------------------------------
# 5. A hub endpoint that accepts and never answers: a bounded wait and a message


def test_silent_hub_endpoint_times_out_naming_the_model(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete in the backlog; nothing ever reads or answers
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}",
        HF_HUB_ETAG_TIMEOUT="2",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=REPO,
        JAX_PLATFORMS="cpu",
    )
    code = "from flux_jax.model_source import resolve_model_dir; resolve_model_dir('someorg/m1')"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=28,
        )
    finally:
        silent.close()
    assert done.returncode != 0
    assert "did not answer the lookup of 'someorg/m1' within 2 s" in done.stderr
    assert "HF_HUB_ETAG_TIMEOUT" in done.stderr


# ----------------------------------------------------------------------------------------------
# 6. Generation lengths are checked against the model's positions and memory before allocating


def test_max_new_tokens_beyond_max_position_embeddings(tiny_model):
    cfg = dataclasses.replace(TINY, max_position_embeddings=64)
    with pytest.raises(ValueError) as error:
        generate(_with_config(tiny_model, cfg), [[5, 6, 7], [8]], max_new_tokens=100)
    assert str(error.value) == (
        "max_new_tokens (generation.max_new_tokens)=100 plus the longest prompt (3 tokens) is "
        "103 positions, beyond the model's max_position_embeddings=64 (its config.json); at "
        "most max_new_tokens=61 fits"
    )
    budget.check_positions(cfg, 3, 61)  # the limit itself is allowed
    with pytest.raises(ValueError, match="shorten the prompt"):
        budget.check_positions(cfg, 64, 1)


def test_kv_cache_that_cannot_fit_is_refused_before_allocating(tiny_model):
    model = _with_config(tiny_model, dataclasses.replace(TINY, max_position_embeddings=10**15))
    # 2 x 2 layers x 2 rows x (16 + 1e12) slots x 2 kv heads x 8 x 4 bytes: 512 TB.
    with pytest.raises(ValueError) as error:
        generate(model, [[5, 6, 7], [8]], max_new_tokens=10**12)
    message = str(error.value)
    needed = 2 * 2 * 2 * (16 + 10**12) * 2 * 8 * 4
    assert message.startswith("max_new_tokens (generation.max_new_tokens)=1000000000000 needs")
    assert f"({needed} bytes) per device" in message and "at most max_new_tokens=" in message
    with pytest.raises(ValueError, match="must be an integer"):
        generate(model, [[5]], max_new_tokens=1e9)


def test_kv_cache_bytes_match_the_allocated_cache(tiny_model):
    spec, params = kv_cache.DecoderSpec.of(tiny_model), kv_cache.decoder_params(tiny_model)
    cache = jax.eval_shape(lambda: kv_cache.init_kv_cache(spec, params, 4, 48))
    allocated = sum(x.size * x.dtype.itemsize for x in cache.values())
    assert budget.kv_cache_bytes_per_device(TINY, 4, 48, np.float32) == allocated
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"), None, "tensor", None)
    )
    assert budget.kv_cache_bytes_per_device(TINY, 4, 48, np.float32, sharding) == allocated // 8


def test_free_memory_uses_the_accelerator_limit():
    class FakeGpu:
        def __init__(self, limit, used):
            self.stats = {"bytes_limit": limit, "bytes_in_use": used}

        def memory_stats(self):
            return self.stats

        def __str__(self):
            return f"gpu(free={self.stats['bytes_limit'] - self.stats['bytes_in_use']})"

    free, where = budget.free_memory([FakeGpu(100, 10), FakeGpu(100, 60)])
    assert (free, where) == (40, "free on gpu(free=40)")
