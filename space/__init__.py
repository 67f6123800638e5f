"""SPACE (Lin et al., ICLR 2020): the model, its training and evaluation.

Not yet implemented: the model and training land with issue 3, evaluation with issue 4. This package
exists now so that the project's layout (DESIGN.md) is in place; `python -m space` says so.
"""

__version__ = "0.0.0"
