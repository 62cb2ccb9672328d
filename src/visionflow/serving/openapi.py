"""The OpenAPI document: FastAPI's for its own routes, plus the two predict routes, which are plain ASGI handlers
FastAPI does not see."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI


def openapi_builder(app: FastAPI, max_batch: int) -> Callable[[], dict[str, Any]]:
    """app.openapi, cached: FastAPI's schema of `app` with the predict routes first."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema["paths"] = {**predict_paths(max_batch), **schema["paths"]}
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def predict_paths(max_batch: int) -> dict[str, Any]:
    """OpenAPI entries for the two predict routes (served by a plain ASGI handler, see predict.py)."""
    review_id = {"type": ["string", "null"], "description": "set when the prediction went to the review queue"}
    detection = {
        "type": "object",
        "description": "a detector's answer: the boxes at or above detection.score_threshold, best first",
        "required": ["boxes", "model_version"],
        "properties": {
            "boxes": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "bbox": {"type": "array", "items": {"type": "number"}, "description": "[x, y, w, h] px"},
                        "label": {"type": "string"},
                        "score": {"type": "number"},
                    },
                },
            },
            "model_version": {"type": "string"},
            "review_id": review_id,
        },
    }
    classification = {
        "type": "object",
        "required": ["label", "confidence", "probabilities", "model_version"],
        "properties": {
            "label": {"type": "string"},
            "confidence": {"type": "number"},
            "probabilities": {"type": "object", "additionalProperties": {"type": "number"}},
            "model_version": {"type": "string"},
            "review_id": review_id,
        },
    }
    prediction = {"oneOf": [classification, detection]}  # which: the served model's task (GET /model)
    errors = {
        "401": "missing or wrong bearer token (when serve.auth_token_env is set)",
        "413": "body or image over serve.max_upload_mb",
        "415": "not an image, or a format not allowed",
        "422": "no file part, or an image that cannot be used (too many pixels, corrupt, too small)",
        "400": "malformed multipart body, or too many parts",
        "503": "server busy (retry after the Retry-After seconds), no model loaded, or predictions cannot be recorded",
        "504": "inference took longer than serve.request_timeout_s",
    }

    def operation(summary: str, form: dict, answer: dict) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": {"type": "object", "properties": form}}},
                },
                "responses": {
                    "200": {"description": "the prediction", "content": {"application/json": {"schema": answer}}},
                    **{k: {"description": v} for k, v in errors.items()},
                },
            }
        }

    binary = {"type": "string", "format": "binary"}
    return {
        "/predict": operation("Classify one uploaded image, or find the objects in it", {"file": binary}, prediction),
        "/predict/batch": operation(
            f"Classify (or find the objects in) up to {max_batch} images in one request",
            {"files": {"type": "array", "items": binary}},
            {"type": "object", "properties": {"predictions": {"type": "array", "items": prediction}}},
        ),
    }
