"""Bundled examples: the seed network that started bnkit, in Keras and in PyTorch."""

from bnkit.examples.seed import SEED_INPUT_SHAPE, keras_seed_model, torch_seed_model

__all__ = ["SEED_INPUT_SHAPE", "keras_seed_model", "torch_seed_model"]
