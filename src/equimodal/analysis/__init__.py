"""Analysis that trains extra models to judge one: the modalities' stand-alone abilities
(relative EDM) and AGM's competition strength. It runs after ``fit``, never inside it."""

from equimodal.analysis.relative_edm import add_relative_edm, fit_run

__all__ = ["add_relative_edm", "fit_run"]
