"""A fingerprint of Python source that ignores what cannot change behaviour: comments, docstrings, layout.

DVC reruns a stage when a dependency's bytes change. Training depends on the model's code, but editing a
docstring or a comment there should not retrain every experiment. dvc.yaml therefore runs a cheap stage
that writes this fingerprint of the modules a stage's result depends on, and the expensive stage depends
on the fingerprint file: its bytes change only when the code's syntax tree does.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Drop the docstring (a leading string expression) of the module and of every class and function."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def source_fingerprint(paths) -> str:
    """SHA-256 over each file's name and its syntax tree without docstrings (comments and layout are not
    in the tree); files in sorted order, so the order given does not matter."""
    h = hashlib.sha256()
    for path in sorted(str(p) for p in paths):
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise FileNotFoundError(f"fingerprint: cannot read {path}: {e.strerror}") from None
        try:
            tree = ast.parse(text, filename=path)
        except SyntaxError as e:
            raise ValueError(f"fingerprint: {path} is not valid Python (line {e.lineno}: {e.msg})") from None
        h.update(path.encode() + b"\0")
        h.update(ast.dump(_strip_docstrings(tree), include_attributes=False).encode() + b"\0")
    return h.hexdigest()
