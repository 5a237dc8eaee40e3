"""Registering a model version: infer its card from the ONNX file and its training data, then write it atomically.

Offline only (the ``vigil models register`` command and the examples): it pulls
in onnxruntime, pandas and git, which the serving path never needs from here.
The card is inferred: features from the reference columns in the model's input
order, their types, observed ranges and nullability; labels or the prediction
range from running the model on the reference data; the heuristic fallback from
the target (or the model's own reference predictions).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from service.core.card import (
    PREDICTION_COLUMN,
    SCORE_COLUMN,
    BucketMedianFallback,
    FeatureSpec,
    FeatureType,
    Label,
    MedianFallback,
    ModelCard,
    OnnxSignature,
    PriorFallback,
    Range,
    RulesFallback,
    Task,
    Training,
)
from service.core.errors import RegistryError, describe_validation
from service.core.predictor import binary_or_top_score
from service.registry.store import CARD_FILE, MODEL_FILE, NAME_RE, REFERENCE_FILE, Registry, sha256_file

_ONNX_ELEM = {
    "tensor(float)": "float",
    "tensor(double)": "double",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(string)": "string",
}


def _load_reference(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise RegistryError(f"reference data {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix == ".csv":
            frame = pd.read_csv(path)
        else:
            raise RegistryError(f"reference data must be .csv or .parquet, got '{path.name}'")
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(f"cannot read reference data {path}: {exc}") from exc
    if frame.empty:
        raise RegistryError(f"reference data {path} has no rows")
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _open_session(model_path: Path) -> Any:
    import onnxruntime as ort

    if not model_path.is_file():
        raise RegistryError(f"model file {model_path} does not exist")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegistryError(f"{model_path} is not a loadable ONNX model: {first_line}") from exc


def _infer_signature(session: Any, frame: Any, target: str | None) -> tuple[OnnxSignature, list[str]]:
    """Map the reference columns onto the graph inputs; returns the signature and feature order."""
    inputs = session.get_inputs()
    columns = [c for c in frame.columns if c != target]
    for inp in inputs:
        if inp.type not in _ONNX_ELEM:
            raise RegistryError(f"model input '{inp.name}' has unsupported type {inp.type}")
    if len(inputs) == 1 and len(inputs[0].shape) == 2 and inputs[0].name not in columns:
        inp = inputs[0]
        width = inp.shape[1]
        if _ONNX_ELEM[inp.type] not in ("float", "double"):
            raise RegistryError(f"model input '{inp.name}' is {inp.type}; a single 2-D input must be float or double")
        if isinstance(width, int) and width != len(columns):
            raise RegistryError(
                f"model input '{inp.name}' takes {width} features but the reference data has "
                f"{len(columns)} feature columns ({', '.join(columns[:5])}{'…' if len(columns) > 5 else ''})"
                + (f" besides the target '{target}'" if target else " (is --target missing?)")
            )
        return OnnxSignature(input_mode="tensor", inputs={inp.name: _ONNX_ELEM[inp.type]}), columns
    missing = [inp.name for inp in inputs if inp.name not in frame.columns]
    if missing:
        raise RegistryError(
            f"the model takes one input per feature, and the reference data is missing column(s): {', '.join(missing)}"
        )
    extra = [c for c in columns if c not in {inp.name for inp in inputs}]
    if extra:
        raise RegistryError(f"reference column(s) not used by the model: {', '.join(extra)} (is --target missing?)")
    return (
        OnnxSignature(input_mode="per_feature", inputs={inp.name: _ONNX_ELEM[inp.type] for inp in inputs}),
        [inp.name for inp in inputs],
    )


def _feature_specs(frame: Any, order: list[str], signature: OnnxSignature) -> list[FeatureSpec]:
    import pandas as pd

    specs = []
    for name in order:
        column = frame[name]
        nullable = bool(column.isna().any())
        elem = signature.inputs.get(name, "float") if signature.input_mode == "per_feature" else "float"
        if elem == "string":
            values = column.dropna().astype(str)
            uniques = sorted(values.unique().tolist())
            specs.append(FeatureSpec(name=name, type="string", nullable=nullable,
                                     categories=uniques if len(uniques) <= 100 else None))
            continue
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise RegistryError(f"feature '{name}' must be numeric for the model, reference data has {column.dtype}")
        ftype: FeatureType = "int" if elem in ("int64", "int32") else "float"
        finite = column.dropna()
        specs.append(FeatureSpec(
            name=name, type=ftype, nullable=nullable,
            min=float(finite.min()) if len(finite) else None,
            max=float(finite.max()) if len(finite) else None,
        ))
    return specs


def _reference_feeds(frame: Any, features: list[FeatureSpec], signature: OnnxSignature) -> dict[str, np.ndarray]:
    names = [f.name for f in features]
    if signature.input_mode == "tensor":
        (input_name, elem), = signature.inputs.items()
        dtype = np.float64 if elem == "double" else np.float32
        return {input_name: frame[names].to_numpy(dtype=dtype)}
    feeds = {}
    for spec in features:
        elem = signature.inputs[spec.name]
        column = frame[spec.name]
        if elem == "string":
            feeds[spec.name] = column.astype(object).where(column.notna(), "").astype(str).to_numpy(dtype=object).reshape(-1, 1)
        elif elem in ("int64", "int32"):  # a null is fed as 0, as the ONNX runtime feeds it when serving
            feeds[spec.name] = column.fillna(0).to_numpy(dtype=np.int64 if elem == "int64" else np.int32).reshape(-1, 1)
        else:
            dtype = np.float64 if elem == "double" else np.float32
            feeds[spec.name] = column.to_numpy(dtype=dtype).reshape(-1, 1)
    return feeds


def _classify_outputs(session: Any, task: Task | None) -> tuple[Task, dict[str, Any]]:
    outputs = session.get_outputs()
    label = next((o for o in outputs if o.type in ("tensor(int64)", "tensor(string)")), None)
    zipmap = next((o for o in outputs if o.type.startswith("seq(map(")), None)
    floats = [o for o in outputs if o.type in ("tensor(float)", "tensor(double)")]
    looks_like_classifier = zipmap is not None or (label is not None and bool(floats))
    task = task or ("classification" if looks_like_classifier else "regression")
    if task == "classification":
        if zipmap is not None:
            return task, {"label_output": label.name if label else None, "probability_output": zipmap.name,
                          "probability_format": "zipmap"}
        if not floats:
            raise RegistryError("a classifier must output class probabilities (a float tensor or a ZipMap)")
        return task, {"label_output": label.name if label else None, "probability_output": floats[0].name,
                      "probability_format": "tensor"}
    if not floats:
        raise RegistryError("a regressor must output a float tensor; the model outputs "
                            + ", ".join(f"{o.name} ({o.type})" for o in outputs))
    return task, {"value_output": floats[0].name}


def _check_finite(values: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])[:5].tolist()
        raise RegistryError(f"{what} on the reference data are NaN/inf (rows {rows}{'…' if bad.sum() > 5 else ''})")


def _decile_edges(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.unique(np.quantile(values, np.linspace(0.1, 0.9, 9)))]


def _git_revision(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def register_model(
    name: str,
    model_file: str | os.PathLike[str],
    reference_file: str | os.PathLike[str],
    *,
    target: str | None = None,
    task: Task | None = None,
    version: str | None = None,
    registry: str | os.PathLike[str] | None = None,
    metadata: dict[str, Any] | None = None,
    pii: dict[str, str] | None = None,
    fallback: dict[str, Any] | None = None,
    output_range: tuple[float, float] | None = None,
) -> ModelCard:
    """Validate a model against its reference data and write a new immutable version.

    Infers the card from the ONNX signature and the reference data; ``pii`` marks
    features as personal data (``{"email": "hash"}``: hashed, or ``"drop"``: never
    logged). ``fallback`` declares the heuristic (rules or per-bucket medians)
    instead of the derived prior/median; ``output_range`` declares the allowed
    range of regression outputs. Nothing is
    written unless every check passes, and the version appears atomically.
    Raises :class:`RegistryError` naming the problem otherwise.
    """
    import pandas as pd

    if not NAME_RE.match(name):
        raise RegistryError(f"model name '{name}' must be 1-64 letters, digits, '_', '.' or '-'")
    if version is not None and (not NAME_RE.match(version) or version.startswith(".")):
        raise RegistryError(f"version '{version}' must be 1-64 letters, digits, '_', '.' or '-'")
    reg = Registry(registry)
    model_path = Path(model_file)
    frame = _load_reference(Path(reference_file))
    if target is not None and target not in frame.columns:
        raise RegistryError(f"target column '{target}' is not in the reference data (columns: {', '.join(frame.columns[:8])}…)")

    session = _open_session(model_path)
    signature, order = _infer_signature(session, frame, target)
    features = _feature_specs(frame, order, signature)
    for feature_name, treatment in (pii or {}).items():
        spec = next((f for f in features if f.name == feature_name), None)
        if spec is None:
            raise RegistryError(f"--pii names '{feature_name}', which is not a feature of the model")
        if treatment not in ("drop", "hash"):
            raise RegistryError(f"--pii {feature_name}={treatment}: use 'drop' or 'hash'")
        spec.pii = treatment  # type: ignore[assignment]
    task, outputs = _classify_outputs(session, task)
    signature = signature.model_copy(update=outputs)

    try:
        feeds = _reference_feeds(frame, features, signature)
        results = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    except Exception as exc:
        raise RegistryError(f"the model fails on the reference data: {str(exc).strip().splitlines()[0]}") from exc

    reference = frame[order + ([target] if target else [])].copy()
    # Rows with a null are judged apart: a model may not take NaN (then those rows go to
    # the fallback when served), but it must answer every complete row with finite values.
    complete = ~frame[order].isna().any(axis=1).to_numpy()
    if not complete.any():
        raise RegistryError("every reference row has a null; the model must be checked on complete rows")
    labels: list[Label] | None = None
    prediction_range: Range | None = None
    if task == "classification":
        probs_raw = results[signature.probability_output]
        if signature.probability_format == "zipmap":
            labels = list(probs_raw[0].keys())
            probs = np.array([[row[k] for k in labels] for row in probs_raw], dtype=np.float64)
        else:
            probs = np.asarray(probs_raw, dtype=np.float64).reshape(len(frame), -1)
            if signature.label_output is not None:
                predicted = np.asarray(results[signature.label_output]).reshape(-1)[complete]
                # Class order: the label of the most probable column, column by column.
                labels = []
                for col in range(probs.shape[1]):
                    hits = predicted[probs[complete].argmax(axis=1) == col]
                    labels.append(hits[0] if len(hits) else None)
                if any(lbl is None for lbl in labels):
                    if target is None:
                        raise RegistryError("cannot tell the class labels: pass --target so they can be read from the reference data")
                    labels = sorted(pd.unique(frame[target]).tolist())
            elif target is not None:
                labels = sorted(pd.unique(frame[target]).tolist())
            else:
                raise RegistryError("the model outputs no labels: pass --target so they can be read from the reference data")
        labels = [lbl.item() if hasattr(lbl, "item") else lbl for lbl in labels]
        if len(labels) != probs.shape[1]:
            raise RegistryError(f"the model gives {probs.shape[1]} probabilities per row but {len(labels)} labels were found")
        _check_finite(probs[complete], "predicted probabilities")
        answered = np.isfinite(probs).all(axis=1)
        handles_missing = bool((~complete).any() and answered.all())
        predicted_labels = [labels[i] if ok else None for i, ok in zip(probs.argmax(axis=1), answered)]
        reference[PREDICTION_COLUMN] = predicted_labels
        score = np.where(answered, binary_or_top_score(probs), np.nan)
        reference[SCORE_COLUMN] = score
        quantiles = _decile_edges(score[answered])
    else:
        values = np.asarray(results[signature.value_output], dtype=np.float64).reshape(len(frame), -1)[:, 0]
        _check_finite(values[complete], "predictions")
        answered = np.isfinite(values)
        handles_missing = bool((~complete).any() and answered.all())
        values = np.where(answered, values, np.nan)
        prediction_range = Range(min=float(values[answered].min()), max=float(values[answered].max()))
        reference[PREDICTION_COLUMN] = values
        quantiles = _decile_edges(values[answered])


    fallback_spec = derive_fallback(task, labels, reference, target, declared=fallback)

    meta = dict(metadata or {})
    version = version or _next_version(reg, name)
    try:
        card = ModelCard(
            name=name,
            version=version,
            task=task,
            features=features,
            signature=signature,
            labels=labels,
            prediction_range=prediction_range,
            prediction_quantiles=quantiles,
            output_range=Range(min=output_range[0], max=output_range[1]) if output_range else None,
            handles_missing=handles_missing,
            fallback=fallback_spec,
            target=target,
            training=_training(frame, meta, Path(model_file)),
            sha256=sha256_file(model_path),
        )
    except ValidationError as exc:
        raise RegistryError(f"the inferred card is invalid: {describe_validation(exc, top='card')}") from exc
    _write_version(reg, card, model_path, reference)
    return card


def _training(frame: Any, meta: dict[str, Any], model_file: Path) -> Training:
    """The card's training section from ``--metadata``; a RegistryError when the metadata cannot go on a card."""
    reserved = sorted({"dataset_fingerprint", "rows", "created_at"} & set(meta))
    if reserved:
        raise RegistryError(f"metadata key(s) {reserved} are set by the registry (use 'train_rows' for the row count)")
    try:
        return Training(
            dataset_fingerprint=_fingerprint(frame),
            rows=int(meta.pop("train_rows", len(frame))),
            parameters=meta.pop("parameters", {}),
            metrics={k: float(v) for k, v in meta.pop("metrics", {}).items()},
            code_revision=meta.pop("code_revision", None) or _git_revision(model_file.resolve().parent),
            created_at=datetime.now(timezone.utc),
            **meta,
        )
    except (TypeError, ValueError, AttributeError) as exc:  # pydantic's ValidationError is a ValueError
        raise RegistryError(f"invalid metadata: {exc}") from exc


def _fingerprint(frame: Any) -> str:
    import pandas as pd

    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    digest = hashlib.sha256(hashed.tobytes())
    digest.update(json.dumps(list(map(str, frame.columns))).encode())
    return "sha256:" + digest.hexdigest()


def _next_version(reg: Registry, name: str) -> str:
    numeric = [int(v) for v in reg.versions(name) if v.isdigit()]
    return str(max(numeric, default=0) + 1)


def _write_version(reg: Registry, card: ModelCard, model_path: Path, reference: Any) -> None:
    model_dir = reg.root / card.name
    final = model_dir / card.version
    if final.exists():
        raise RegistryError(f"{card.name}:{card.version} already exists; versions are immutable (omit --version for the next one)")
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".staging-{card.version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        shutil.copyfile(model_path, staging / MODEL_FILE)
        if sha256_file(staging / MODEL_FILE) != card.sha256:
            raise RegistryError(f"{model_path} changed while it was being registered")
        reference.to_parquet(staging / REFERENCE_FILE, index=False)
        card_text = yaml.safe_dump(card.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)
        (staging / CARD_FILE).write_text(card_text)
        for item in staging.iterdir():
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())
        # rename() onto an existing non-empty directory fails, so a concurrent writer of the
        # same version loses cleanly instead of mixing files.
        try:
            os.rename(staging, final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise RegistryError(f"{card.name}:{card.version} already exists; versions are immutable") from exc
            raise RegistryError(f"cannot write {final}: {exc.strerror or exc}") from exc
        dir_fd = os.open(model_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def derive_fallback(task: str, labels: list[Any] | None, reference: Any, target: str | None,
                    declared: dict[str, Any] | None = None) -> Any:
    """The card's fallback: the declared one (completed from the reference data), else prior or median.

    The target column is the truth to summarise; without one, the model's own
    reference predictions stand in for it.
    """
    truth = reference[target] if target and target in reference else reference[PREDICTION_COLUMN]
    truth = truth.dropna()
    if declared is not None:
        kind = declared.get("kind")
        try:
            if kind == "rules":
                return RulesFallback.model_validate(declared)
            if kind == "bucket_median":
                if task != "regression":
                    raise RegistryError("fallback kind 'bucket_median' is for regression models")
                return _bucket_medians(BucketMedianFallback.model_validate(declared), reference, truth)
        except ValidationError as exc:
            raise RegistryError(f"invalid declared fallback: {describe_validation(exc, 'fallback.', 'fallback')}") from None
        if kind in ("prior", "median"):
            pass  # derived below; a declared prior/median is just a request for the default
        else:
            raise RegistryError(f"fallback kind must be one of rules, bucket_median, prior, median; got {kind!r}")
    if task == "classification":
        assert labels is not None
        if truth.dtype.kind == "f" and truth.mod(1).eq(0).all():
            truth = truth.astype(np.int64)  # integer labels read as floats because the target has nulls
        shares = truth.astype(str).value_counts(normalize=True)
        return PriorFallback(probabilities={str(label): float(shares.get(str(label), 0.0)) for label in labels})
    return MedianFallback(value=float(np.median(truth.to_numpy(dtype=np.float64))))


def _bucket_medians(spec: BucketMedianFallback, reference: Any, truth: Any) -> BucketMedianFallback:
    if spec.feature not in reference:
        raise RegistryError(f"fallback.feature '{spec.feature}' is not a column of the reference data")
    feature = reference.loc[truth.index, spec.feature].to_numpy(dtype=np.float64)
    target = truth.to_numpy(dtype=np.float64)
    known = ~np.isnan(feature)
    edges = spec.edges or sorted(set(np.quantile(feature[known], [0.2, 0.4, 0.6, 0.8]).tolist()))
    overall = float(np.median(target))
    bucket = np.searchsorted(np.asarray(edges), feature[known], side="left")
    values = []
    for b in range(len(edges) + 1):
        members = target[known][bucket == b]
        values.append(float(np.median(members)) if len(members) else overall)
    return spec.model_copy(update={"edges": [float(e) for e in edges], "values": values,
                                   "default": spec.default if spec.default is not None else overall})
