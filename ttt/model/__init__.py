"""The TTT-E2E model: blocks, the stacked decoder, and the inner loop."""

from ttt.model.layers import FastParam
from ttt.model.loop import inner_loop_nll, loss_fn, masked_mean, sequence_nll, token_nll
from ttt.model.params import param_counts
from ttt.model.transformer import TTTModel, abstract_model, compute_dtype, create_model

__all__ = [
    "FastParam",
    "TTTModel",
    "abstract_model",
    "compute_dtype",
    "create_model",
    "inner_loop_nll",
    "loss_fn",
    "masked_mean",
    "param_counts",
    "sequence_nll",
    "token_nll",
]
