"""What importing a fastsp module drags in: the config modules are leaves; checkpoints never load
the loss; libraries never import a command's module.

Each import check runs in a fresh interpreter, since this test process has imported everything.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import fastsp
from fastsp import (
    attention,
    config,
    config_fields,
    data,
    data_policy,
    diffusion,
    dit,
    flow,
    model_config,
    perceptual,
    reference,
    unet,
)

REPO = Path(__file__).resolve().parents[1]
# the training objective and its Triton kernels
_OBJECTIVE = ("fastsp.perceptual", "fastsp.feature_loss", "fastsp.kernels", "triton")
# The config modules, each with the config modules it imports: all leaves, that import no torch
# and nothing else of fastsp but the ground floor, fastsp.errors.
_CONFIG_LEAVES = {
    "fastsp.config_fields": set(),
    "fastsp.family_config": {"fastsp.config_fields"},
    "fastsp.model_config": {"fastsp.config_fields", "fastsp.family_config"},
    "fastsp.diffusers_unet_config": {
        "fastsp.config_fields",
        "fastsp.model_config",
        "fastsp.family_config",
    },
    "fastsp.config": {
        "fastsp.config_fields",
        "fastsp.model_config",
        "fastsp.diffusers_unet_config",
        "fastsp.family_config",
    },
    "fastsp.config_file": {"fastsp.model_config", "fastsp.config"},
    "fastsp.config_cli": {"fastsp.config_fields", "fastsp.model_config", "fastsp.config"},
}


def _config_modules_below(module: str) -> set[str]:
    """The config modules that importing `module` imports, directly or not."""
    below = set(_CONFIG_LEAVES[module])
    for imported in _CONFIG_LEAVES[module]:
        below |= _config_modules_below(imported)
    return below


def _modules_after(statement: str) -> set[str]:
    """The names in sys.modules after `statement` in a fresh interpreter run from the repo."""
    probe = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_checkpoint_and_sampling_do_not_import_the_objective():
    modules = _modules_after("import fastsp.checkpoint, fastsp.sample, fastsp.config")
    assert "fastsp.checkpoint" in modules and "fastsp.sample" in modules
    loaded = [
        m for m in modules if m in _OBJECTIVE or m.startswith(tuple(n + "." for n in _OBJECTIVE))
    ]
    assert not loaded, f"importing a checkpoint or the sampler loaded {loaded}"


def test_the_libraries_never_import_a_command_module():
    """sample.py and evaluate.py are command lines over fastsp.sampling and fastsp.evaluation:
    the trainer and those libraries import the libraries, never the commands."""
    libraries = "fastsp.training.loop, fastsp.sampling, fastsp.evaluation, fastsp.checkpoint"
    modules = _modules_after(f"import {libraries}")
    assert "fastsp.sampling" in modules and "fastsp.evaluation" in modules
    assert not {"fastsp.sample", "fastsp.evaluate"} & modules


def test_the_digits_job_imports_neither_diffusers_nor_transformers():
    """They come with the `sd` extra: the trainer, the main job and the sampler run without it."""
    modules = _modules_after("import fastsp.training.loop, fastsp.pipeline, fastsp.sample")
    assert "fastsp.training.loop" in modules and "fastsp.pipeline" in modules
    assert "diffusers" not in modules and "transformers" not in modules


def test_every_config_module_is_listed():
    on_disk = {f"fastsp.{p.stem}" for p in (REPO / "fastsp").glob("*config*.py")}
    assert on_disk == set(_CONFIG_LEAVES)


@pytest.mark.parametrize("module", sorted(_CONFIG_LEAVES))
def test_a_config_module_alone_imports_no_torch_and_only_the_config_modules_below_it(module):
    modules = _modules_after(f"import {module}")
    assert not [m for m in modules if m == "torch" or m.startswith("torch.")]
    fastsp_modules = {m for m in modules if m.split(".")[0] == "fastsp"}
    expected = {"fastsp", module, "fastsp.errors", *_config_modules_below(module)}
    assert fastsp_modules == expected


@pytest.mark.parametrize("module", sorted(_CONFIG_LEAVES))
def test_a_config_module_source_imports_only_the_standard_library(module):
    allowed = {"fastsp.errors", *_CONFIG_LEAVES[module]}
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module not in allowed:
            names.add((node.module or "").split(".")[0])
    assert names - {"__future__"} <= sys.stdlib_module_names, names - sys.stdlib_module_names


def test_errors_is_the_ground_floor():
    tree = ast.parse((REPO / "fastsp" / "errors.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_public_names_are_lazy_but_all_there():
    from fastsp import (  # noqa: F401
        FeatureMSELoss,
        NoiseSchedule,
        SelfPerceptualLoss,
        TritonUnavailableError,
        UNet,
        UNetConfig,
        feature_mse,
        feature_mse_multi,
    )

    assert set(fastsp.__all__) <= set(dir(fastsp))
    for name in ("feature_mse", "SelfPerceptualLoss", "UNet", "UNetConfig", "NoiseSchedule"):
        assert name in dir(fastsp)
    assert fastsp.UNetConfig is unet.UNetConfig is model_config.UNetConfig
    assert fastsp.NoiseSchedule is diffusion.NoiseSchedule
    with pytest.raises(AttributeError, match="no_such_name"):
        fastsp.no_such_name  # noqa: B018


def test_public_names_import_from_a_fresh_interpreter():
    statement = (
        "from fastsp import feature_mse, SelfPerceptualLoss, UNet, UNetConfig, NoiseSchedule\n"
        "import fastsp\n"
        "assert {'feature_mse', 'SelfPerceptualLoss', 'UNet', 'UNetConfig', 'NoiseSchedule'}"
        " <= set(dir(fastsp))"
    )
    assert "fastsp.feature_loss" in _modules_after(statement)


def test_each_vocabulary_has_one_definition():
    """The modules that use a vocabulary, a value parser or a model config hold the object of
    the config module that defines it (config_fields, model_config)."""
    shared = {
        diffusion: ("BETA_SCHEDULES", "PREDICTION_TYPES", "SAMPLERS"),
        flow: ("FLOW_T_SAMPLING", "SAMPLERS"),
        perceptual: (
            "DISTANCES",
            "PREDICTED_NOISE",
            "parse_layers",
            "parse_perceptual_on_t",
            "parse_perceptual_t",
        ),
        attention: ("ATTENTION_BACKENDS",),
        reference: ("PREDICTION_TYPES",),
        unet: ("UNetConfig",),
        dit: ("DiTConfig",),
        data: ("DATA_FORMATS", "is_int"),
        data_policy: ("ON_BAD_DATA",),
        model_config: ("ATTENTION_BACKENDS", "is_int"),
        config: (
            "PREDICTION_TYPES",
            "SAMPLERS",
            "DIFFUSIONS",
            "FLOW_T_SAMPLING",
            "parse_layers",
            "UNetConfig",
            "MODEL_PRESETS",
        ),
    }
    for module, names in shared.items():
        for name in names:
            home = config_fields if name in vars(config_fields) else model_config
            assert getattr(module, name) is getattr(home, name), f"{module.__name__}.{name}"
