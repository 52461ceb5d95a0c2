"""Shared by the int8 and W8A8 tests: a Linear with seeded random weights."""

import torch


def random_linear(N: int, K: int, bias: bool, g: torch.Generator) -> torch.nn.Linear:
    lin = torch.nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(N, generator=g))
    return lin
