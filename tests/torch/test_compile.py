"""bnkit.torch layers under torch.compile: one graph, the eager layer's results.

``backend="aot_eager"`` runs Dynamo and AOTAutograd (where a Python float is turned into a
graph input) without Inductor's C++ build, so the test stays fast. A second layer with another
momentum makes Dynamo recompile with ``momentum`` as a symbolic float: the Keras convention's
running-variance weight, ``(1 - m) * (n - 1) / n`` folded into one Python float, used to fail
there on a guard that rounds differently from Python ("Guard failed on the same frame it was
created").
The eager twin is torch.nn itself for the torch convention, and bnkit's eager Keras-convention
layer (checked against Keras 3 in test_vs_keras) for the Keras one.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

import bnkit.torch as bt


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_compiled_layer_matches_eager_across_recompiles(convention):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g) * 2 + 1
    momenta = (0.5, 0.99) if convention == "keras" else (0.5, 0.1)
    for momentum in momenta:
        compiled = bt.BatchNorm2d(3, momentum=momentum, convention=convention)
        if convention == "torch":
            eager = nn.BatchNorm2d(3, momentum=momentum)
        else:
            eager = bt.BatchNorm2d(3, momentum=momentum, convention=convention)
        step = torch.compile(compiled, backend="aot_eager", fullgraph=True)
        for _ in range(2):
            y = step(x)
            y_eager = eager(x)
            torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
        # the compiled update may round the weights' product in another order: 1 ulp
        torch.testing.assert_close(compiled.running_mean, eager.running_mean, rtol=2e-7, atol=0)
        torch.testing.assert_close(compiled.running_var, eager.running_var, rtol=2e-7, atol=0)
        assert int(compiled.num_batches_tracked) == int(eager.num_batches_tracked) == 2
        compiled.eval()
        eager.eval()
        torch.testing.assert_close(step(x), eager(x), rtol=0, atol=0)
    torch._dynamo.reset()
