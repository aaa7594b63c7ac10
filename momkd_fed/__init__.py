"""momkd-fed: federated Momentum Memory Knowledge Distillation for computational pathology."""

__version__ = "0.1.0"
