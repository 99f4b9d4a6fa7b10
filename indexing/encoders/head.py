"""The projection head of the default encoder: pooled image features -> text space.

A small MLP trained LiT-style (see :mod:`indexing.encoders.train_default_head`) maps the
image features (1280-d pooled EfficientNet-Lite0 + 65-d colour histogram) into the 384-d
all-MiniLM-L6-v2 space::

    z = (x - in_mean) / in_std                       standardise
    h = gelu(z @ w0 + b0)                            hidden layer(s)
    y = h @ w1 + b1  (+ z @ skip when present)        output, plus an optional linear path
    out = y / ||y||                                   unit norm

The weights live in a plain ``.npz`` file (no pickle: ``np.load(allow_pickle=False)``),
float16 or float32, with an ``arch`` entry holding a JSON description. This module
needs numpy only; :meth:`ProjectionHead.apply` uses torch when given a torch tensor.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexing.atomic import write_atomically
from sce_correct.errors import InputError

HEAD_FORMAT = "sce-retrieval/projection-head/v1"


@dataclass
class ProjectionHead:
    """Weights of the projection head. ``weights`` and ``biases`` are per linear layer."""

    in_mean: np.ndarray
    in_std: np.ndarray
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    skip: np.ndarray | None = None
    activation: str = "gelu"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def in_dim(self) -> int:
        return int(self.in_mean.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.weights[-1].shape[1])

    def validate(self) -> "ProjectionHead":
        d = self.in_dim
        if self.in_std.shape != (d,):
            raise InputError(f"in_std has shape {self.in_std.shape}, expected ({d},)")
        if len(self.weights) != len(self.biases) or not self.weights:
            raise InputError("a head needs as many biases as weights, and at least one layer")
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.ndim != 2 or w.shape[0] != d or b.shape != (w.shape[1],):
                raise InputError(f"layer {i}: weight {w.shape} / bias {b.shape} do not chain from {d}")
            d = w.shape[1]
        if self.skip is not None and self.skip.shape != (self.in_dim, self.out_dim):
            raise InputError(f"skip has shape {self.skip.shape}, expected ({self.in_dim}, {self.out_dim})")
        if self.activation not in _NUMPY_ACTIVATIONS:
            raise InputError(f"unknown activation {self.activation!r}")
        return self

    # -- inference ---------------------------------------------------------------------
    def apply(self, x):
        """Project features ``(n, in_dim)`` -> unit-norm ``(n, out_dim)``.

        ``x`` may be a numpy array (computed in float32 numpy) or a torch tensor
        (computed with torch on the tensor's device).
        """
        if isinstance(x, np.ndarray):
            return self._apply_numpy(x)
        return self._apply_torch(x)

    def _apply_numpy(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float32) - self.in_mean.astype(np.float32)) / self.in_std.astype(np.float32)
        h = z
        act = _NUMPY_ACTIVATIONS[self.activation]
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w.astype(np.float32) + b.astype(np.float32)
            if i < len(self.weights) - 1:
                h = act(h)
        if self.skip is not None:
            h = h + z @ self.skip.astype(np.float32)
        return (h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def _apply_torch(self, x):
        import torch

        cache = getattr(self, "_torch_cache", None)
        if cache is None or cache[0] != (x.device, x.dtype):
            def t(a):
                return torch.as_tensor(np.asarray(a, np.float32), device=x.device)

            params = ([t(w) for w in self.weights], [t(b) for b in self.biases],
                      t(self.in_mean), t(self.in_std),
                      None if self.skip is None else t(self.skip))
            cache = ((x.device, x.dtype), params)
            object.__setattr__(self, "_torch_cache", cache)
        ws, bs, mean, std, skip = cache[1]
        z = (x.float() - mean) / std
        h = z
        for i, (w, b) in enumerate(zip(ws, bs)):
            h = h @ w + b
            if i < len(ws) - 1:
                h = torch.nn.functional.gelu(h) if self.activation == "gelu" else torch.relu(h)
        if skip is not None:
            h = h + z @ skip
        return torch.nn.functional.normalize(h, dim=-1)

    # -- files -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, dtype=np.float16) -> None:
        """Write the head to ``path`` (.npz) atomically; weights stored as ``dtype``."""
        self.validate()
        arch = {"format": HEAD_FORMAT, "activation": self.activation,
                "layers": [list(w.shape) for w in self.weights], "skip": self.skip is not None,
                "meta": self.meta}
        arrays = {"arch": np.asarray(json.dumps(arch, sort_keys=True)),
                  "in_mean": self.in_mean.astype(np.float32), "in_std": self.in_std.astype(np.float32)}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            arrays[f"w{i}"] = w.astype(dtype)
            arrays[f"b{i}"] = b.astype(np.float32)
        if self.skip is not None:
            arrays["skip"] = self.skip.astype(dtype)

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as fh:  # a file object: savez would append ".npz" to a name
                np.savez_compressed(fh, **arrays)
            os.chmod(temporary, 0o644)

        write_atomically(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ProjectionHead":
        """Read a head written by :meth:`save` (no pickle involved)."""
        with np.load(path, allow_pickle=False) as data:
            arch = json.loads(str(data["arch"]))
            if arch.get("format") != HEAD_FORMAT:
                raise InputError(f"{path}: not a projection head file (format {arch.get('format')!r})")
            n = len(arch["layers"])
            head = cls(in_mean=data["in_mean"].astype(np.float32), in_std=data["in_std"].astype(np.float32),
                       weights=[data[f"w{i}"].astype(np.float32) for i in range(n)],
                       biases=[data[f"b{i}"].astype(np.float32) for i in range(n)],
                       skip=data["skip"].astype(np.float32) if arch.get("skip") else None,
                       activation=arch.get("activation", "gelu"), meta=arch.get("meta", {}))
        return head.validate()


def _gelu_np(x: np.ndarray) -> np.ndarray:
    from math import sqrt

    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - scipy is a project dependency
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + erf(x / sqrt(2.0)))


_NUMPY_ACTIVATIONS = {"gelu": _gelu_np, "relu": lambda x: np.maximum(x, 0.0)}
