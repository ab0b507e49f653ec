"""Serve quality predictions from the exported ONNX file, with no torch on the import path.

The ONNX file carries its feature schema in its metadata (``feature_schema``, JSON), so the
runtime refuses features built with another schema. ``onnxruntime`` comes from the ``cpu``
extra (or ``onnxruntime-gpu`` from the ``gpu`` extra on GPU servers; never both).
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

    def predict(self, features: np.ndarray, schema: FeatureSchema | dict[str, Any] | None = None
                ) -> np.ndarray:
        """Probabilities [B, 2] for features [B, F] (or [F])."""
        if schema is not None:
            self.schema.check_compatible(schema)
        x = np.asarray(features, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.shape[-1] != self.schema.dim:
            raise ValueError(f"expected {self.schema.dim} features ({self.schema.id}), "
                             f"got {x.shape[-1]}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        return self.session.run(None, {self.input_name: x})[0]
