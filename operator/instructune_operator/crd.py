"""The CustomResourceDefinition, generated from the API models (api.py): pydantic's JSON schema made
structural OpenAPI v3 as the API server wants it. `hack/gen_crd.py` writes it to crds/ and the chart."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from instructune_operator.api import (
    GROUP,
    KIND,
    NAME_RULES,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    InstructionTuneSpec,
    InstructionTuneStatus,
)

_DROP_KEYS = {"title", "additionalProperties", "$defs"}


def _openapi(node: Any, defs: dict[str, Any]) -> Any:
    """Pydantic JSON schema -> structural OpenAPI v3 as the API server wants it (no refs, no nulls)."""
    if isinstance(node, list):
        return [_openapi(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _openapi(_inline_ref(node, defs), defs)
    if "anyOf" in node:
        return _openapi(_without_null(node), defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_openapi_entry(key, value, defs))
    if node.get("type") == "object" and "properties" not in node:
        values = node.get("additionalProperties")
        if isinstance(values, dict) and values:
            out["additionalProperties"] = _openapi(values, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if "enum" in out and "type" not in out:
        kinds = {type(v) for v in out["enum"]}
        out["type"] = "integer" if kinds == {int} else "string"
    return out


def _inline_ref(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The referenced definition with the referring node's keys on top; CEL rules of both kept."""
    target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
    extra = {k: v for k, v in node.items() if k != "$ref"}
    rules = target.get("x-kubernetes-validations", []) + extra.pop("x-kubernetes-validations", [])
    merged = {**target, **extra}
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def _without_null(node: dict[str, Any]) -> dict[str, Any]:
    """`X | None` as X (an absent field is the API's null); any other union is not structural."""
    options = [o for o in node["anyOf"] if o.get("type") != "null"]
    rest = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
    if len(options) != 1:
        raise ValueError(f"unions are not structural: {node}")
    merged = {**options[0], **rest}
    if node.get("default") is not None:
        merged["default"] = node["default"]
    return merged


def _openapi_entry(key: str, value: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """One key of a schema node in OpenAPI v3's spelling (nothing for what the API server refuses)."""
    if key in _DROP_KEYS:
        return {}
    if key == "properties":
        return {key: {name: _openapi(prop, defs) for name, prop in value.items()}}
    if key == "exclusiveMinimum":
        return {"minimum": value, "exclusiveMinimum": True}
    if key == "exclusiveMaximum":
        return {"maximum": value, "exclusiveMaximum": True}
    if key == "const":
        return {"enum": [value]}
    if key == "default" and (value is None or (isinstance(value, (dict, list)) and value)):
        return {}
    return {key: _openapi(value, defs)}


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _openapi(raw, raw.get("$defs", {}))


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition, as written to crds/ and shipped in the Helm chart."""
    spec = openapi_schema(InstructionTuneSpec)
    status = openapi_schema(InstructionTuneStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["instructune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {
                            "name": "Progress",
                            "type": "integer",
                            "jsonPath": ".status.progress.percent",
                            "description": "Percent of training steps done",
                        },
                        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
                        {"name": "Eval", "type": "string", "jsonPath": ".status.evaluation.summary"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "InstructionTune tunes a base model on instruction-response data on a "
                            "Ray cluster, evaluates it and, when the gate passes, serves it.",
                            "required": ["spec"],
                            "x-kubernetes-validations": NAME_RULES,
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version of the object."},
                                "kind": {"type": "string", "description": "Kind of the object."},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }
