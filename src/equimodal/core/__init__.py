"""The bottom layer: pieces every other layer uses and that import nothing of equimodal.

* :mod:`equimodal.core.registry` — the one :class:`Registry` behind every extension point;
* :mod:`equimodal.core.registries` — the five registries (strategies, datasets, preparers,
  encoders, fusions) and where their built-ins and plugins come from;
* :mod:`equimodal.core.shard` — the shard of a global batch under torchrun, which models
  and strategies consult for batch statistics;
* :mod:`equimodal.core.files` — atomic file writes that honour the umask;
* :mod:`equimodal.core.validation` — pydantic errors as one line.
"""
