"""Serve quality predictions from the exported ONNX file, with no torch on the import path.

The ONNX file carries its feature schema in its metadata (``feature_schema``, JSON), so the
runtime refuses features built with another schema. A predictor with router heads also takes
the raw prompt embedding (``prompt_embedding`` input; its model, weights and pooling in the
``prompt_embedding`` metadata) and returns the router's per-stage probabilities.
``onnxruntime`` comes from the ``cpu`` extra (or ``onnxruntime-gpu`` from the ``gpu`` extra
on GPU servers; never both).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.cascade.features import FeatureSchema
from toolkit.common.errors import UserError


class PredictorFileError(UserError, ValueError):
    """The predictor file is missing, truncated or not a predictor."""


class OnnxQualityPredictor:
    """Predict (p_correct, p_agreement) for raw feature rows with onnxruntime.

    Args:
        path: the ``.onnx`` file written by ``python cli.py export`` or at the end of ``fit``.
        threads: intra-op threads (1 is fastest for batch-1 calls on a busy CPU).
    """

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("no ONNX runtime installed: pip install -e '.[cpu]' (or '.[gpu]' "
                              "on GPU servers; never both)") from None
        path = Path(path)
        if not path.is_file():
            raise PredictorFileError(f"predictor file {path} does not exist")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise PredictorFileError(f"{path} is not a valid ONNX predictor "
                                     f"({str(err).splitlines()[0][:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "feature_schema" not in meta:
            raise PredictorFileError(f"{path} has no feature_schema metadata: not a predictor "
                                     "exported by this toolkit")
        self.schema = FeatureSchema.from_dict(json.loads(meta["feature_schema"]))
        self.input_name = self.session.get_inputs()[0].name
        names = [i.name for i in self.session.get_inputs()]
        self.reads_prompt = "prompt_embedding" in names
        # The embedding model's spec (slug, sha256, layers, pooling, dim), or None.
        self.embedding: dict[str, Any] | None = (
            json.loads(meta["prompt_embedding"]) if self.reads_prompt else None)
        self.embedding_dim = int(self.session.get_inputs()[names.index("prompt_embedding")]
                                 .shape[1]) if self.reads_prompt else 0

    @staticmethod
    def _rows(a: np.ndarray, dim: int, what: str) -> np.ndarray:
        x = np.asarray(a, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.shape[-1] != dim:
            raise ValueError(f"expected {dim} {what}, got {x.shape[-1]}")
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contain NaN or inf")
        return x

    def _run(self, x: np.ndarray, embedding: np.ndarray | None, output: str) -> np.ndarray:
        """One output of the graph (asking for one output only saves ~0.7 µs a call)."""
        feeds = {self.input_name: x}
        if self.reads_prompt:
            if embedding is None:
                raise ValueError("this predictor reads the prompt embedding; none was given")
            e = self._rows(embedding, self.embedding_dim, "prompt embedding values")
            # One prompt's embedding serves all its rows (e.g. the stages of one prompt).
            feeds["prompt_embedding"] = np.broadcast_to(e, (len(x), e.shape[1]))
        return self.session.run([output], feeds)[0]

    def predict(self, features: np.ndarray, schema: FeatureSchema | dict[str, Any] | None = None,
                embedding: np.ndarray | None = None) -> np.ndarray:
        """Post-draft probabilities [B, 2] for features [B, F] (or [F]); a predictor that
        reads the prompt also needs the prompt's raw ``embedding`` [B, D] (or [D])."""
        if schema is not None:
            self.schema.check_compatible(schema)
        x = self._rows(features, self.schema.dim, f"features ({self.schema.id})")
        return self._run(x, embedding, self.session.get_outputs()[0].name)

    def route(self, embedding: np.ndarray) -> np.ndarray:
        """Router probabilities [B, L] (P(stage k answers correctly)) for raw prompt embeddings
        [B, D] (or [D]), before any stage has run."""
        if not self.reads_prompt:
            raise ValueError("this predictor has no router heads (exported without prompt "
                             "embeddings)")
        e = self._rows(embedding, self.embedding_dim, "prompt embedding values")
        return self._run(np.zeros((len(e), self.schema.dim), np.float32), e, "router")
