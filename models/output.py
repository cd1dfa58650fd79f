"""What every backbone returns."""

from typing import NamedTuple

import torch


class ModelOutput(NamedTuple):
    """`logits` (B, classes) from the head and `embedding` (B, features), the pooled representation the head sees.

    A NamedTuple so traced and exported graphs keep two plain outputs in this order.
    """

    logits: torch.Tensor
    embedding: torch.Tensor
