"""FluxConfig: the tutorial's YAML, the shipped configs, validation messages, overrides, I/O."""

import copy
import math
import pathlib
import pickle
import re

import ml_collections
import pytest

from flux_jax.config import ConfigError, FluxConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# The `dpo-config.yaml` block of the flux DPO tutorial, character for character.
TUTORIAL_YAML = """\
model_path: Qwen/Qwen3-8B
output_dir: ./outputs/dpo

sglang:
  base_url: http://localhost:8000

# Training settings
num_steps: 1000
batch_size: 8
learning_rate: 5.0e-7  # Lower LR for DPO

# DPO algorithm
algorithm:
  name: dpo
  beta: 0.1              # Temperature parameter
  reference_free: false  # Use reference model
  label_smoothing: 0.0   # Optional smoothing

# DPO doesn't need async (no rollouts)
adaptive_async:
  enabled: false

checkpoint:
  save_steps: 200
"""


def write(tmp_path: pathlib.Path, text: str, name: str = "dpo-config.yaml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(tmp_path: pathlib.Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        FluxConfig.from_yaml(path)
    assert str(path) in str(info.value), "errors from a file must name the file"
    return str(info.value)


def override_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        FluxConfig.default().apply_overrides(list(overrides))
    return str(info.value)


# --- The tutorial's YAML ----------------------------------------------------------------------


def test_shipped_yaml_is_the_tutorials_verbatim():
    assert (CONFIGS / "dpo-config.yaml").read_text() == TUTORIAL_YAML


def test_tutorial_yaml_loads_and_every_key_means_what_it_says():
    config = FluxConfig.from_yaml(CONFIGS / "dpo-config.yaml")
    assert config.model_path == "Qwen/Qwen3-8B"
    assert config.output_dir == "./outputs/dpo"
    assert config.sglang.base_url == "http://localhost:8000"  # accepted, unused by DPO
    assert config.num_steps == 1000
    assert config.batch_size == 8
    assert config.learning_rate == 5e-7 and isinstance(config.learning_rate, float)
    assert config.algorithm.name == "dpo"
    assert config.algorithm.beta == 0.1
    assert config.algorithm.reference_free is False
    assert config.algorithm.label_smoothing == 0.0
    assert config.adaptive_async.enabled is False
    assert config.checkpoint.save_steps == 200
    # Keys the YAML leaves out keep their defaults.
    default = FluxConfig.default()
    assert config.checkpoint.max_to_keep == default.checkpoint.max_to_keep
    assert config.algorithm.loss_type == "sigmoid"
    assert config.data.to_dict() == default.data.to_dict()


def test_tutorial_variants_from_its_text(tmp_path):
    # "Reference-free DPO" and "Use label smoothing" snippets, merged into the tutorial config.
    text = TUTORIAL_YAML.replace("reference_free: false", "reference_free: true")
    text = text.replace("label_smoothing: 0.0 ", "label_smoothing: 0.1 ")
    config = FluxConfig.from_yaml(write(tmp_path, text))
    assert config.algorithm.reference_free is True
    assert config.algorithm.label_smoothing == 0.1


def test_yaml_exponent_without_dot_is_converted_for_float_keys(tmp_path):
    # Decision: PyYAML reads `5e-7` as the string "5e-7"; for a float key it means the number.
    config = FluxConfig.from_yaml(write(tmp_path, "learning_rate: 5e-7\noptimizer: {eps: 1E-6}\n"))
    assert config.learning_rate == 5e-7 and isinstance(config.learning_rate, float)
    assert config.optimizer.eps == 1e-6


def test_ints_are_accepted_for_float_keys(tmp_path):
    config = FluxConfig.from_yaml(write(tmp_path, "algorithm:\n  beta: 1\n"))
    assert config.algorithm.beta == 1.0 and isinstance(config.algorithm.beta, float)


def test_empty_yaml_and_empty_sections_are_the_default(tmp_path):
    assert FluxConfig.from_yaml(write(tmp_path, "")) == FluxConfig.default()
    text = "checkpoint:\n  # save_steps: 100\nalgorithm:\n"
    assert FluxConfig.from_yaml(write(tmp_path, text)) == FluxConfig.default()


# --- Shipped configs --------------------------------------------------------------------------

PY_CONFIGS = sorted(CONFIGS.glob("*.py"))


def test_all_expected_config_files_ship():
    names = {p.name for p in PY_CONFIGS}
    assert {"dpo_qwen3_8b.py", "dpo_qwen3_0p6b.py", "dpo_qwen2p5_7b.py", "tiny_demo.py"} <= names


@pytest.mark.parametrize("path", PY_CONFIGS, ids=lambda p: p.name)
def test_py_config_loads_validates_and_documents_itself(path):
    config = FluxConfig.from_file(str(path))
    assert isinstance(config, FluxConfig)
    config.validate()
    text = path.read_text()
    docstring = text.split('"""')[1]
    assert f"flux-jax train --config configs/{path.name}" in docstring
    for topic in ("Hardware:", "Expect:", "0.693"):
        assert topic in docstring, f"{path.name} docstring lacks {topic!r}"
    assert re.search(r'def get_config\(.*\).*:\n\s+"""', text), "get_config needs a docstring"


@pytest.mark.parametrize("path", [*PY_CONFIGS, REPO / "flux_jax" / "demo.py"], ids=lambda p: p.name)
def test_config_files_set_only_what_differs_from_the_default(path):
    """Every `config.a.b = <literal>` in a config file changes the default: a reader sees the
    run's choices, not a copy of the schema."""
    import ast

    default = FluxConfig.default()
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)):
            continue
        for target in node.targets:
            dotted = ast.unparse(target)
            if dotted.startswith("config."):
                key = dotted.removeprefix("config.")
                assert node.value.value != default[key], f"{path.name}: {key} is the default"


def test_qwen3_8b_config_is_the_tutorial_run():
    config = FluxConfig.from_file(str(CONFIGS / "dpo_qwen3_8b.py"))
    tutorial = FluxConfig.from_yaml(CONFIGS / "dpo-config.yaml")
    for key in ("model_path", "output_dir", "num_steps", "batch_size", "learning_rate"):
        assert config[key] == tutorial[key], key
    assert config.algorithm.to_dict() == tutorial.algorithm.to_dict()
    assert config.checkpoint.save_steps == 200
    assert config.model.compute_dtype == "bfloat16"
    assert config.model.param_dtype == "float32"
    assert config.model.remat == "full"
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (1, -1, 1)


def test_tiny_demo_uses_the_builtin_model():
    config = FluxConfig.from_file(str(CONFIGS / "tiny_demo.py"))
    assert config.model_path == "builtin:tiny-qwen3"
    assert config.model.compute_dtype == "float32"


def test_default_is_valid_and_uses_the_builtin_model():
    config = FluxConfig.default()
    assert config == FluxConfig()
    assert config.validate() is config
    assert config.model_path == "builtin:tiny-qwen3"
    assert config.algorithm.beta == 0.1 and config.checkpoint.save_steps == 200
    assert config.data.bucket_lengths == ()
    assert FluxConfig.default().apply_overrides(["data.bucket_lengths=64,2048"])  # > max is fine
    assert isinstance(config, ml_collections.ConfigDict)


# --- Unknown keys -----------------------------------------------------------------------------


def test_unknown_nested_yaml_key_names_file_and_closest_key(tmp_path):
    message = load_error(tmp_path, TUTORIAL_YAML.replace("  beta: 0.1", "  bta: 0.1"))
    assert message.endswith(
        "dpo-config.yaml: unknown key 'algorithm.bta'; did you mean 'algorithm.beta'?"
    )


def test_unknown_top_level_yaml_key(tmp_path):
    message = load_error(tmp_path, "num_step: 10\n")
    assert "unknown key 'num_step'; did you mean 'num_steps'?" in message


@pytest.mark.parametrize(
    "snippet, key, home",
    [
        ("beta: 0.2\n", "beta", "algorithm.beta"),
        ("save_steps: 100\n", "save_steps", "checkpoint.save_steps"),
        ("model:\n  beta: 0.2\n", "model.beta", "algorithm.beta"),
    ],
)
def test_right_key_at_the_wrong_level_is_pointed_home(tmp_path, snippet, key, home):
    assert f"unknown key '{key}'; did you mean '{home}'?" in load_error(tmp_path, snippet)


def test_unknown_key_without_close_match_lists_the_section(tmp_path):
    message = load_error(tmp_path, "checkpoint:\n  zzzzzz: 1\n")
    assert "unknown key 'checkpoint.zzzzzz'" in message and "save_steps" in message


def test_unknown_keys_in_overrides():
    assert "unknown key 'algorithm.bta'; did you mean 'algorithm.beta'?" in override_error(
        "algorithm.bta=0.2"
    )
    assert "unknown key 'learning_rte'; did you mean 'learning_rate'?" in override_error(
        "learning_rte=1e-6"
    )


def test_unknown_key_in_py_config_names_the_file(tmp_path):
    path = write(
        tmp_path,
        "from flux_jax.config import FluxConfig\n"
        "def get_config():\n"
        "    config = FluxConfig.default()\n"
        "    config.checkpoint.save_step = 100\n"
        "    return config\n",
        name="typo.py",
    )
    with pytest.raises(ConfigError, match=r"typo\.py: unknown key 'checkpoint\.save_step'; "
                       r"did you mean 'checkpoint\.save_steps'\?"):  # fmt: skip
        FluxConfig.from_file(str(path))


def test_unknown_key_in_plain_configdict_config(tmp_path):
    path = write(
        tmp_path,
        "import ml_collections\n"
        "def get_config():\n"
        "    config = ml_collections.ConfigDict()\n"
        "    config.optimizer = dict(warmup_step=10)\n"
        "    return config\n",
        name="plain.py",
    )
    with pytest.raises(ConfigError, match=r"plain\.py: .*did you mean 'optimizer\.warmup_steps'"):
        FluxConfig.from_file(str(path))


def test_unknown_key_in_from_dict():
    with pytest.raises(ConfigError, match="did you mean 'data.max_length'"):
        FluxConfig.from_dict({"data": {"max_lenght": 64}})


# --- Wrong types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("batch_size: eight\n", "batch_size expects an integer, got str 'eight'"),
        ("num_steps: 1e3\n", "num_steps expects an integer, got str '1e3' (write a plain"),
        ("num_steps: 10.0\n", "num_steps expects an integer, got float 10.0"),
        ("learning_rate: fast\n", "learning_rate expects a number, got str 'fast'"),
        ("learning_rate: true\n", "learning_rate expects a number, got bool True"),
        ("algorithm:\n  reference_free: 1\n", "algorithm.reference_free expects a boolean"),
        ("model_path:\n", "model_path expects a string, got null"),
        ("model_path: 7\n", "model_path expects a string, got int 7"),
        ("data:\n  bucket_lengths: [64, x]\n", "data.bucket_lengths expects a list of integers"),
        ("algorithm: dpo\n", "algorithm is a section"),
        ("algorithm:\n  beta: {x: 1}\n", "algorithm.beta expects a number, got dict"),
    ],
)
def test_wrong_types_name_the_key_and_the_type(tmp_path, snippet, expected):
    assert expected in load_error(tmp_path, snippet)


def test_assignment_is_type_checked():
    config = FluxConfig.default()
    with pytest.raises(ConfigError, match="algorithm.beta expects a number"):
        config.algorithm.beta = "high"
    with pytest.raises(ConfigError, match="did you mean 'algorithm.beta'"):
        config.algorithm.bta = 0.2
    with pytest.raises(AttributeError, match="did you mean 'algorithm.beta'"):
        _ = config.algorithm.bta
    config.algorithm.beta = 1  # int for a float key
    assert isinstance(config.algorithm.beta, float)


def test_sections_take_a_mapping_of_their_keys_at_any_depth():
    """`config.section = {...}` sets those keys and keeps the others, for a top-level section and
    one inside a section alike; anything else names the section and its keys."""
    config = FluxConfig.default()
    config.algorithm = dict(beta=0.3)
    config.model.lora = dict(rank=8)
    config["model.lora"] = {"alpha": 4.0}
    assert (config.algorithm.beta, config.model.lora.rank, config.model.lora.alpha) == (0.3, 8, 4.0)
    assert config.algorithm.loss_type == FluxConfig.default().algorithm.loss_type
    with pytest.raises(ConfigError, match=r"algorithm is a section: set its keys \(name, beta, "):
        config.algorithm = 0.2
    with pytest.raises(ConfigError, match=r"model\.lora is a section: set its keys \(rank, alpha"):
        config.model.lora = 8


def test_all_problems_are_reported_at_once(tmp_path):
    message = load_error(tmp_path, "num_step: 1\nbatch_size: x\nalgorithm:\n  bta: 1\n")
    assert "3 problems" in message
    assert all(k in message for k in ("'num_step'", "batch_size", "'algorithm.bta'"))


def test_duplicate_yaml_keys_are_refused(tmp_path):
    assert "duplicate key 'beta'" in load_error(tmp_path, "algorithm:\n  beta: 0.1\n  beta: 0.2\n")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --- Ranges and rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["algorithm.beta=0"], "algorithm.beta must be > 0"),
        (["algorithm.beta=-0.1"], "algorithm.beta must be > 0"),
        (["algorithm.label_smoothing=0.5"], "algorithm.label_smoothing must be in [0, 0.5)"),
        (["algorithm.label_smoothing=-0.1"], "algorithm.label_smoothing must be in [0, 0.5)"),
        (["learning_rate=0"], "learning_rate must be > 0"),
        (["learning_rate=nan"], "learning_rate expects a number"),
        (["num_steps=0"], "num_steps must be >= 1"),
        (["batch_size=0"], "batch_size must be >= 1"),
        (["batch_size=6", "grad_accum_steps=4"], "batch_size (6) must be divisible by grad_"),
        (["data.max_prompt_length=1024"], "data.max_prompt_length (1024) must be < data.max_len"),
        (["data.bucket_lengths=512,256"], "data.bucket_lengths must be strictly increasing"),
        (["data.bucket_lengths=256"], "the largest >= data.max_length"),
        (["data.bucket_lengths=0,1024"], "data.bucket_lengths must be strictly increasing"),
        (["optimizer.warmup_steps=2000"], "optimizer.warmup_steps must be in [0, num_steps]"),
        (["generation.top_p=0"], "generation.top_p must be in (0, 1]"),
        (["mesh.data=-1"], "mesh: at most one of data, fsdp, tensor, expert may be -1"),
        (["mesh.tensor=0"], "mesh.tensor must be >= 1, or -1"),
        (["checkpoint.save_steps=0"], "checkpoint.save_steps must be >= 1"),
        (["model.logprob_chunk_mib=-1"], "model.logprob_chunk_mib must be >= 0 (0 = no cap)"),
        (["algorithm.reference_free=true", "algorithm.kl_coef=0.1"], "algorithm.kl_coef > 0 nee"),
    ],
)
def test_out_of_range_values_name_the_key(overrides, expected):
    assert expected in override_error(*overrides)


def test_out_of_range_in_yaml_names_file_and_key(tmp_path):
    message = load_error(tmp_path, TUTORIAL_YAML.replace("beta: 0.1", "beta: -1.0"))
    assert "dpo-config.yaml: algorithm.beta must be > 0, got -1.0" in message


@pytest.mark.parametrize(
    "override, valid",
    [
        ("algorithm.loss_type=focal", "'sigmoid', 'ipo', 'hinge', 'robust'"),
        ("data.format=pairs", "'preferences', 'conversational'"),
        ("model.remat=some", "'none', 'full', 'dots'"),
        ("model.compute_dtype=float16", "'float32', 'bfloat16'"),
        ("optimizer.schedule=step", "'constant', 'cosine', 'linear'"),
        ("data.on_bad_record=warn", "'error', 'skip'"),
        ("model.attention=flash", "'xla', 'cudnn', 'splash', 'auto'"),
    ],
)
def test_unknown_enum_values_list_the_valid_ones(override, valid):
    key = override.split("=")[0]
    assert f"{key} must be one of {valid}" in override_error(override)


def test_only_dpo_is_implemented():
    assert "flux_jax implements only 'dpo'" in override_error("algorithm.name=grpo")


def test_adaptive_async_with_dpo_is_refused_with_the_reason(tmp_path):
    text = TUTORIAL_YAML.replace("enabled: false", "enabled: true")
    message = load_error(tmp_path, text)
    assert "adaptive_async.enabled=true is not supported" in message
    assert "DPO has no rollouts" in message


def test_label_smoothing_only_with_losses_that_use_it():
    # Decision: an error, not TRL's warning: hinge and ipo would silently ignore the setting.
    message = override_error("algorithm.label_smoothing=0.1", "algorithm.loss_type=hinge")
    assert "algorithm.label_smoothing=0.1 has no effect with loss_type='hinge'" in message
    assert "has no effect" in override_error(
        "algorithm.label_smoothing=0.1", "algorithm.loss_type=ipo"
    )
    for loss in ("sigmoid", "robust"):
        config = FluxConfig.default().apply_overrides(
            ["algorithm.label_smoothing=0.1", f"algorithm.loss_type={loss}"]
        )
        assert config.algorithm.label_smoothing == 0.1


def test_validate_catches_hand_made_inconsistency():
    config = FluxConfig.default()
    config.batch_size = 6
    config.grad_accum_steps = 4  # Each assignment is type-valid; the pair is not.
    with pytest.raises(ConfigError, match="must be divisible by grad_accum_steps"):
        config.validate()


# --- Overrides --------------------------------------------------------------------------------


def test_overrides_apply_with_types():
    config = FluxConfig.default()
    returned = config.apply_overrides(
        [
            "algorithm.beta=0.2",
            "learning_rate=5e-7",
            "num_steps=500",
            "algorithm.reference_free=true",
            "model_path=/models/qwen3",
            "--config.model.remat=full",  # a raw absl-style flag works too
            "data.bucket_lengths=(256, 1024)",
            "tokenizer_path=",
            "logging.tensorboard=False",
        ]
    )
    assert returned is config
    assert config.algorithm.beta == 0.2 and isinstance(config.algorithm.beta, float)
    assert config.learning_rate == 5e-7
    assert config.num_steps == 500
    assert config.algorithm.reference_free is True
    assert config.model_path == "/models/qwen3"
    assert config.model.remat == "full"
    assert config.data.bucket_lengths == (256, 1024)
    assert config.tokenizer_path == ""
    assert config.logging.tensorboard is False


@pytest.mark.parametrize(
    "override, expected",
    [
        ("num_steps=ten", "num_steps expects an integer, got str 'ten'"),
        ("num_steps=2.5", "num_steps expects an integer"),
        ("algorithm.beta=high", "algorithm.beta expects a number, got str 'high'"),
        ("checkpoint.resume=maybe", "checkpoint.resume expects a boolean"),
        ("data.bucket_lengths=64,x", "data.bucket_lengths expects a list of integers"),
        ("algorithm.beta", "expected key=value"),
        ("algorithm=dpo", "algorithm is a section"),
    ],
)
def test_bad_overrides_name_the_override_and_key(override, expected):
    message = override_error(override)
    assert f"override {override!r}" in message and expected in message


def test_failed_overrides_leave_the_config_unchanged():
    config = FluxConfig.default()
    with pytest.raises(ConfigError):
        config.apply_overrides(["algorithm.beta=0.3", "batch_size=0"])
    assert config == FluxConfig.default()


# --- Files and round trips --------------------------------------------------------------------


def test_from_file_passes_the_arg_to_get_config(tmp_path):
    path = write(
        tmp_path,
        '"""Test config."""\n'
        "from flux_jax.config import FluxConfig\n"
        "def get_config(arg=None):\n"
        '    """Steps from the arg."""\n'
        "    config = FluxConfig.default()\n"
        "    config.num_steps = int(arg) if arg else 7\n"
        "    return config\n",
        name="steps.py",
    )
    assert FluxConfig.from_file(f"{path}:42").num_steps == 42
    assert FluxConfig.from_file(str(path)).num_steps == 7


def test_from_file_accepts_plain_dict_and_yaml(tmp_path):
    path = write(tmp_path, "def get_config():\n    return {'algorithm': {'beta': 0.3}}\n", "d.py")
    assert FluxConfig.from_file(str(path)).algorithm.beta == 0.3
    yaml_path = write(tmp_path, TUTORIAL_YAML)
    assert FluxConfig.from_file(str(yaml_path)) == FluxConfig.from_yaml(yaml_path)


def test_from_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        FluxConfig.from_file(str(tmp_path / "missing.py"))
    path = write(tmp_path, "X = 1\n", "nothing.py")
    with pytest.raises(ConfigError, match=r"nothing\.py: defines no get_config"):
        FluxConfig.from_file(str(path))
    with pytest.raises(ConfigError, match="cannot read config file"):
        FluxConfig.from_yaml(tmp_path / "missing.yaml")


def test_to_yaml_from_yaml_round_trip(tmp_path):
    config = FluxConfig.from_yaml(CONFIGS / "dpo-config.yaml").apply_overrides(
        [
            "data.bucket_lengths=128,256,1024",
            "optimizer.eps=1e-6",
            "algorithm.loss_type=robust",
            "algorithm.label_smoothing=0.05",
            "tokenizer_path=",
            "mesh.fsdp=4",
            "mesh.data=-1",
        ]
    )
    path = tmp_path / "out" / "config.yaml"
    text = config.to_yaml(path)
    assert path.read_text().endswith(text)
    again = FluxConfig.from_yaml(path)
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert again.data.bucket_lengths == (128, 256, 1024)


def test_dict_round_trip_and_plain_output():
    config = FluxConfig.default().apply_overrides(["data.bucket_lengths=64,1024"])
    as_dict = config.to_dict()
    assert as_dict["data"]["bucket_lengths"] == [64, 1024]  # plain lists: YAML/JSON-ready
    assert list(as_dict)[:3] == ["model_path", "tokenizer_path", "output_dir"]  # schema order
    assert FluxConfig.from_dict(as_dict) == config
    assert FluxConfig.from_dict(ml_collections.ConfigDict(as_dict)) == config
    assert not math.isnan(as_dict["learning_rate"])


def test_pickle_and_deepcopy_keep_the_schema():
    config = FluxConfig.default().apply_overrides(["algorithm.beta=0.25"])
    for clone in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config)):
        assert clone == config and isinstance(clone, FluxConfig)
        with pytest.raises(ConfigError, match="did you mean"):
            clone.algorithm.bta = 1.0
    section = pickle.loads(pickle.dumps(config.data))  # sections travel alone, e.g. to workers
    assert section == config.data


def test_reads_naturally():
    config = FluxConfig.default()
    assert config.algorithm.beta == config["algorithm.beta"] == config["algorithm"]["beta"]
    assert config.checkpoint.save_steps == 200
    config.algorithm = {"beta": 0.3}  # a dict updates just those keys
    assert config.algorithm.beta == 0.3 and config.algorithm.name == "dpo"
