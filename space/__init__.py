"""SPACE (Lin et al., ICLR 2020): the model, its training and evaluation.

`python -m space {train,sample,show,evaluate,summary,curves} --help`: model.py (the foreground, the
background, the ELBO, as the paper writes them), windows.py and recompute.py (its exact optimisations:
windowed compositing, activation checkpointing), sparse.py (an approximation that skips empty cells),
train.py (the training loop), evaluate.py and metrics.py (table 1's scores).
"""

__version__ = "0.0.0"
