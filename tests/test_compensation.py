"""Bias compensation in every layer, against the dense model's own forward in float64.

Compensation promises (pruning/structured/compensation.py) that each removed input feature of an output
projection is replaced by its mean over the calibration tokens, the mean taken as the pruned model sees them
(earlier layers already pruned and compensated). The reference here is that promise built directly: the dense
model, in float64, with a pre-hook on every layer's output projection that overwrites the removed features by
their mean, each mean measured by running this very reference (its earlier hooks in place) over the calibration
tokens. The pruned model must carry, in each layer, the bias those means imply, and compute what the reference
computes on any tokens.
"""

import copy

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from llmprune.inputs.models import decoder_layers
from llmprune.pruning.structured import StructuredConfig, prune_structured

LAYERS = 4
SCALE = 5.0  # on the decoder layers' weight matrices


def token_ids(n, seqlen, seed):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def removed_features(entry: dict, units: int, width: int) -> torch.Tensor:
    """The output projection's input features that the record's removed units covered."""
    per = width // units
    return torch.tensor([unit * per + k for unit in entry.removed for k in range(per)], dtype=torch.long)


def mean_replaced_reference(dense, output_name: str, removed: list[torch.Tensor], calibration: torch.Tensor):
    """The dense model in float64 with each layer's removed features replaced by their calibration mean, and the
    means (one per layer, over every input feature of the output projection)."""
    reference = copy.deepcopy(dense).double()
    means = []
    for layer, features in zip(decoder_layers(reference)[1], removed):
        projection = layer.get_submodule(output_name)
        seen = []
        recording = projection.register_forward_pre_hook(
            lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            reference(calibration)
        recording.remove()
        mean = torch.cat(seen).mean(0)
        assert torch.cat(seen).shape[0] == calibration.numel()  # every calibration token, once
        means.append(mean)

        def replace(module, args, features=features, value=mean[features]):
            replaced = args[0].clone()
            replaced[..., features] = value
            return (replaced, *args[1:])

        projection.register_forward_pre_hook(replace)
    return reference, means


def contribution(projection, features: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """What the removed features at their mean add to the dense projection's output: its own forward on that
    input, less its forward on zeros (no assumption about how the module stores its weight)."""
    only_removed = torch.zeros_like(mean)
    only_removed[features] = mean[features]
    with torch.no_grad():
        return projection(only_removed[None])[0] - projection(torch.zeros_like(mean)[None])[0]


@pytest.mark.parametrize("family,structure,output_name,options", [
    ("llama", "channels", "mlp.down_proj", {"round_to": 1}),  # no bias: mlp_bias adds one
    ("gpt2", "channels", "mlp.c_proj", {"round_to": 1}),  # a bias already, a transposed (Conv1D) weight
    ("llama", "heads", "self_attn.o_proj", {"heads_mode": "groups"}),  # whole KV groups
    ("gemma3", "heads", "self_attn.o_proj", {"heads_mode": "query"}),  # query heads within each group
])
def test_every_layer_carries_the_mean_of_what_it_removed(family, structure, output_name, options):
    """Each layer's bias is the removed features' mean contribution, the means measured behind the earlier
    layers' replacements (a runner that measured them in the dense model fails from layer 1 on), and the pruned
    model computes the mean-replaced dense model on the calibration tokens and on others."""
    dense = tiny_model(family, layers=LAYERS)
    with torch.no_grad():  # initial weights (std 0.02) give features whose means are too small to tell apart
        for layer in decoder_layers(dense)[1]:
            for parameter in layer.parameters():
                if parameter.dim() == 2:
                    parameter.mul_(SCALE)
    model = copy.deepcopy(dense)
    calibration = token_ids(4, 16, seed=1)
    report = prune_structured(model, calibration, StructuredConfig(
        structure=structure, method="magnitude", sparsity=0.5, bias_compensation="on", **options), progress=False).structure
    assert report.bias_compensation and len(report.layers) == LAYERS

    probe = token_ids(2, 12, seed=7)
    widths = []  # the output projection's input features in the dense model
    hook = decoder_layers(dense)[1][0].get_submodule(output_name).register_forward_pre_hook(
        lambda module, args: widths.append(args[0].shape[-1]))
    with torch.no_grad():
        dense(probe)
    hook.remove()
    removed = [removed_features(entry, report.units_before, widths[0]) for entry in report.layers]
    reference, means = mean_replaced_reference(dense, output_name, removed, calibration)

    for index, (dense_layer, pruned_layer) in enumerate(zip(decoder_layers(dense)[1], decoder_layers(model)[1])):
        dense_projection = copy.deepcopy(dense_layer.get_submodule(output_name)).double()
        expected = contribution(dense_projection, removed[index], means[index])
        old_bias = dense_projection.bias if dense_projection.bias is not None else torch.zeros_like(expected)
        carried = pruned_layer.get_submodule(output_name).bias.detach().double() - old_bias.detach()
        assert expected.abs().max() > 1e-2, "removed features with a zero mean cannot show a wrong compensation"
        torch.testing.assert_close(carried, expected, rtol=1e-4, atol=1e-6, msg=f"layer {index}")

    with torch.no_grad():
        for tokens in (calibration, probe):
            torch.testing.assert_close(model(tokens).logits.double(), reference(tokens).logits, rtol=1e-4, atol=1e-5)
