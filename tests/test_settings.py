"""Each setting has one owner: a method's knobs in its registered config class, the structure fields in
StructuredConfig; configs are frozen; a saved config reads back to the same settings."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from llmprune.cli import given_fields, prune_parser
from llmprune.config import PruneConfig, RecoverConfig, RunConfig, prune_config_from
from llmprune.errors import LLMPruneError
from llmprune.pruning import registry
from llmprune.pruning.registry import AdmmConfig, AdmmUpdateConfig, OwlConfig, RiaConfig, SparseGPTConfig
from llmprune.pruning.structured.config import StructuredConfig


def test_knob_flags_go_to_the_config_of_what_reads_them():
    config = prune_config_from({"method": "admm", "update": "admm", "admm_iterations": 30, "admm_gradual_steps": 25,
                                "allocation": "owl", "owl_m": 7.0})
    assert config.method_config == AdmmConfig(admm_iterations=30, admm_gradual_steps=25)
    assert config.update_config == AdmmUpdateConfig(admm_iterations=30)  # one flag, both readers
    assert config.allocation_config == OwlConfig(owl_m=7.0)
    assert prune_config_from({"method": "wanda"}).update_config is None


@pytest.mark.parametrize("given,message", [
    ({"method": "wanda", "blocksize": 64}, "--blocksize is a setting of --method sparsegpt, and this run uses "
                                           "--method wanda: drop it"),
    ({"owl_lambda": 0.1}, "--owl-lambda is a setting of --allocation owl, and this run uses --allocation uniform"),
    ({"structure": "channels", "ria_alpha": 1.0}, "--ria-alpha is a setting of --method ria, and this run uses "
                                                  "--structure channels"),
    ({"method": "wanda", "percdamp": float("nan")}, "--percdamp must be a finite number"),  # the value first
    ({"method": "sparsegpt", "pattern": "2:4", "blocksize": 6}, "--blocksize 6 must be a multiple of M=4"),
    ({"method": "admm", "admm_iterations": 5}, "--admm-gradual-steps 15 must not exceed --admm-iterations 5"),
    ({"allocation": "owl", "sparsity": 0.05}, "--owl-lambda 0.08 must keep every layer's sparsity"),
])
def test_a_knob_is_checked_by_its_owner_and_refused_where_nothing_reads_it(given, message):
    with pytest.raises(LLMPruneError, match="^" + re.escape(message)):
        prune_config_from(given)


def test_method_config_must_be_the_method_s():
    with pytest.raises(LLMPruneError, match="method_config is a RiaConfig, but --method sparsegpt reads "
                                            "SparseGPTConfig"):
        PruneConfig(method="sparsegpt", method_config=RiaConfig(ria_alpha=0.3))
    with pytest.raises(LLMPruneError, match="unknown setting"):
        PruneConfig(method="sparsegpt", method_config={"blocksise": 64})
    # A `replace` that changes the method drops the old method's defaults for the new method's.
    assert dataclasses.replace(PruneConfig(), method="ria").method_config == RiaConfig()
    assert dataclasses.replace(PruneConfig(allocation="owl"), allocation="uniform").allocation_config is None


def test_saved_config_nests_the_knobs_and_reads_back(tmp_path):
    config = RunConfig(prune=PruneConfig(method="sparsegpt", pattern="4:8", method_config={"blocksize": 64}),
                       recover="lm", recovery=RecoverConfig(steps=3))
    config.save(tmp_path / "llmprune_config.json")
    saved = json.loads((tmp_path / "llmprune_config.json").read_text())
    assert saved["prune"]["method_config"] == {"blocksize": 64, "percdamp": 0.01, "sparsegpt_compare": "matrix"}
    assert saved["prune"]["update_config"] is None and "blocksize" not in saved["prune"]
    assert RunConfig.from_dict(saved) == config


def test_flat_config_file_with_every_knob_reads():
    """A config file may list knobs flat, as flags are; those of methods the run does not use must be at
    their defaults."""
    flat = {"method": "sparsegpt", "blocksize": 32, **{f.name: f.default for config in registry.knob_configs()
                                                      for f in dataclasses.fields(config) if f.name != "blocksize"}}
    config = RunConfig.from_dict({"prune": flat})
    assert config.prune.method_config == SparseGPTConfig(blocksize=32)
    with pytest.raises(LLMPruneError, match="--ria-alpha is a setting of --method ria"):
        RunConfig.from_dict({"prune": {**flat, "ria_alpha": 0.25}})


def test_flags_override_a_file_and_a_new_method_drops_its_knobs():
    base = RunConfig(prune=PruneConfig(method="ria", method_config={"ria_alpha": 0.25})).to_dict()["prune"]
    assert prune_config_from({"sparsity": 0.6}, base).method_config == RiaConfig(ria_alpha=0.25)
    assert prune_config_from({"ria_alpha": 0.75}, base).method_config == RiaConfig(ria_alpha=0.75)
    assert prune_config_from({"method": "sparsegpt"}, base).method_config == SparseGPTConfig()


def test_configs_are_frozen():
    config = RunConfig(prune=PruneConfig(structure="channels", remove_params=0.2))
    for target, name in ((config, "model"), (config.prune, "sparsity"), (config.recovery, "lr"),
                         (config.prune.structured(), "round_to")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(target, name, None)
    assert config.prune.sparsity is None  # --remove-params chooses it later, in the run's plan


def test_every_registered_knob_has_its_flag_and_recovery_flags_keep_their_own_settings():
    parser = prune_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for config in registry.knob_configs():
        for f in dataclasses.fields(config):
            assert "--" + f.name.replace("_", "-") in flags, f.name
    args = vars(parser.parse_args(["--recover-seqlen", "16", "--seqlen", "64", "--lora-r", "4"]))
    assert given_fields(PruneConfig, args) == {"seqlen": 64}
    assert given_fields(RecoverConfig, args) == {"seqlen": 16, "r": 4}


def test_structure_fields_are_structured_config_s():
    prune_fields = {f.name: f for f in dataclasses.fields(PruneConfig)}
    for f in dataclasses.fields(StructuredConfig):
        if f.metadata.get("help"):
            assert prune_fields[f.name].metadata == f.metadata and prune_fields[f.name].default == f.default
    with pytest.raises(LLMPruneError, match="--heads-mode must be one of query, groups"):
        PruneConfig(structure="heads", heads_mode="kv")
    assert PruneConfig(structure="channels").sparsity == StructuredConfig().sparsity


def test_config_and_help_import_no_torch_and_no_algorithm():
    code = ("import sys\nimport llmprune.config\nfrom llmprune.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in sys.modules if m == 'torch' or m.startswith('llmprune.pruning')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split("LOADED")[-1]
    assert "torch" not in eval(loaded)
    assert set(eval(loaded)) <= {"llmprune.pruning", "llmprune.pruning.registry", "llmprune.pruning.structured",
                                 "llmprune.pruning.structured.config"}
    for table in (registry.METHODS, registry.UPDATES, registry.IMPORTANCES):
        for name, entry in table.items():
            assert f"{name}" in done.stdout and entry.summary in " ".join(done.stdout.split()), name
