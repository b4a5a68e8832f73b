"""Export as it was done before it streamed, kept as the tests' reference: the whole model in
memory, each injected layer replaced by its plain layer holding the merged weight."""

from torch import nn
from transformers.pytorch_utils import Conv1D

from pst_ds.layers.inject import iter_injected


def merge_layers(model: nn.Module) -> None:
    """Replace every injected layer (PST or a baseline's) by the plain layer it wrapped, holding
    its merged weight (M * W' for pruned layers)."""
    for name, layer in list(iter_injected(model)):
        weight = layer.merged_weight()
        if layer.transposed:
            plain = Conv1D(layer.out_features, layer.in_features)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        plain.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, plain)
