"""``torch.fx`` tracing that keeps every batch norm a leaf.

``torch.fx.symbolic_trace`` keeps ``torch.nn`` layers as ``call_module`` nodes but traces
into layers defined elsewhere, bnkit's batch norms included, which would dissolve them into
``F.batch_norm`` calls. Folding, conversion and diagnosis need the layers, so they trace
with :func:`symbolic_trace`.
"""

from __future__ import annotations

from torch import fx, nn

__all__ = ["BatchNormLeafTracer", "symbolic_trace"]


class BatchNormLeafTracer(fx.Tracer):
    """An ``fx.Tracer`` that never traces into a batch norm (``torch.nn``, bnkit, torchvision's frozen one)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from bnkit.torch.frozen import is_torchvision_frozen

        if isinstance(m, nn.modules.batchnorm._NormBase) or is_torchvision_frozen(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(root: nn.Module) -> fx.GraphModule:
    """Like ``torch.fx.symbolic_trace``, with batch norms kept as ``call_module`` nodes."""
    tracer = BatchNormLeafTracer()
    graph = tracer.trace(root)
    name = root.__class__.__name__ if isinstance(root, nn.Module) else root.__name__
    return fx.GraphModule(tracer.root, graph, name)
