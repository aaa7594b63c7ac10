"""Synthetic multi-site cohorts (``momkd-fed synth``): TRIDENT feature files, manifests, genomics and a
federation YAML, from a documented generative model (see :mod:`momkd_fed.synth.generator`)."""

from .presets import PRESETS, make_preset, synthesize

__all__ = ["PRESETS", "make_preset", "synthesize"]
