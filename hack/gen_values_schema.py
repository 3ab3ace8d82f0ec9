"""Writes charts/instructune/values.schema.json, the schema Helm holds the chart's values to (helm
lint, template, install and upgrade refuse values it rejects, naming the field).

`settings` is the operator's settings file verbatim, so its schema is generated from the operator's
own model (instructune_operator.settings.Settings): what the operator would refuse at start-up,
Helm refuses at install. The rest of the values are the chart's own (values.yaml) and described
here; every object is closed (`additionalProperties: false`), so a mistyped key is an error rather
than a value silently ignored.

`python hack/gen_values_schema.py --check` exits non-zero when the committed file differs (drift).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from generated import ROOT, write_or_check

from instructune_operator.settings import Settings

TARGET = ROOT / "charts" / "instructune" / "values.schema.json"

# Kubernetes' own rules (k8s.io/apimachinery validation and the OpenAPI of core/v1).
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A label or annotation key: an optional DNS-subdomain prefix and a name.
QUALIFIED_NAME = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"  # a key of a ConfigMap or Secret
# A Prometheus duration (the ServiceMonitor CRD's pattern for `interval`).
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
# Printable ASCII but '=' (RelaxedEnvironmentVariableValidation, on by default since v1.32).
ENV_NAME = r"^[ -<>-~]+$"


def closed(properties: dict[str, Any], *required: str, **extra: Any) -> dict[str, Any]:
    """An object with exactly these properties: an unknown (e.g. mistyped) key is refused."""
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return {**schema, **extra}


def string_map(keys: str | None = None, values: dict[str, Any] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": values or {"type": "string"}}
    if keys:
        schema["propertyNames"] = {"pattern": keys}
    return schema


STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
ID = {"type": "integer", "minimum": 0}
QUANTITY_VALUE = {"type": ["string", "number"], "pattern": QUANTITY}
OBJECT = {"type": "object"}  # nested Kubernetes structures the chart passes through as they are
PROFILE = closed(
    {"type": {"enum": ["RuntimeDefault", "Unconfined", "Localhost"]}, "localhostProfile": STRING}, "type"
)
SE_LINUX = closed({"level": STRING, "role": STRING, "type": STRING, "user": STRING})
WINDOWS = closed(
    {
        "gmsaCredentialSpec": STRING,
        "gmsaCredentialSpecName": STRING,
        "hostProcess": BOOLEAN,
        "runAsUserName": STRING,
    }
)
KEY_REF = closed(
    {"name": STRING, "key": {"type": "string", "pattern": CONFIG_KEY}, "optional": BOOLEAN}, "key"
)


def chart_values(settings: dict[str, Any]) -> dict[str, Any]:
    """The schema of values.yaml, in its order; `settings` is the operator's."""
    name_override = {"type": "string", "pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"}
    env_var = closed(
        {
            "name": {"type": "string", "pattern": ENV_NAME},
            "value": STRING,
            "valueFrom": closed(
                {
                    "configMapKeyRef": KEY_REF,
                    "secretKeyRef": KEY_REF,
                    "fieldRef": closed({"apiVersion": STRING, "fieldPath": STRING}, "fieldPath"),
                    "resourceFieldRef": closed(
                        {"containerName": STRING, "resource": STRING, "divisor": QUANTITY_VALUE}, "resource"
                    ),
                }
            ),
        },
        "name",
    )
    toleration = closed(
        {
            "key": STRING,
            "operator": {"enum": ["Exists", "Equal"]},
            "value": STRING,
            "effect": {"enum": ["", "NoSchedule", "PreferNoSchedule", "NoExecute"]},
            "tolerationSeconds": {"type": "integer"},
        }
    )
    return closed(
        {
            # Helm hands a parent chart's `global` values to every subchart.
            "global": OBJECT,
            "image": closed(
                {
                    "repository": {"type": "string", "minLength": 1},
                    "tag": {"type": "string", "description": "Empty: the chart's appVersion."},
                    "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                }
            ),
            "imagePullSecrets": {
                "type": "array",
                "items": closed({"name": {"type": "string", "pattern": DNS_SUBDOMAIN}}, "name"),
            },
            # At most 1 as well, but the template refuses 2 and more itself, saying why (Kopf runs
            # standalone, two operators would reconcile every tune twice).
            "replicas": {"type": "integer", "minimum": 0, "description": "0 pauses the operator; at most 1."},
            "nameOverride": name_override,
            "fullnameOverride": name_override,
            "serviceAccount": closed({"annotations": string_map(QUALIFIED_NAME)}),
            "rbac": closed({"create": BOOLEAN, "ownerReferencesPermissionEnforcement": BOOLEAN}),
            "settings": settings,
            "rayAuth": closed({"enabled": BOOLEAN}),
            "rayAuthTokenSecretRef": closed(
                {
                    "name": {"type": "string", "pattern": DNS_SUBDOMAIN, "maxLength": 253},
                    "key": {"type": "string", "pattern": CONFIG_KEY},
                },
                dependentRequired={"key": ["name"]},
            ),
            "extraEnv": {"type": "array", "items": env_var},
            "argocd": closed({"healthCheck": closed({"enabled": BOOLEAN})}),
            "metrics": closed(
                {
                    "serviceMonitor": closed(
                        {
                            "enabled": BOOLEAN,
                            # Prometheus' duration format, as the ServiceMonitor CRD holds it.
                            "interval": {"type": "string", "pattern": DURATION},
                            "labels": string_map(
                                QUALIFIED_NAME, {"type": "string", "pattern": LABEL_VALUE, "maxLength": 63}
                            ),
                        }
                    ),
                    "grafanaDashboard": closed({"enabled": BOOLEAN}),
                }
            ),
            "resources": closed(
                {
                    "requests": string_map(values=QUANTITY_VALUE),
                    "limits": string_map(values=QUANTITY_VALUE),
                    "claims": {"type": "array", "items": closed({"name": STRING, "request": STRING}, "name")},
                }
            ),
            "podSecurityContext": closed(
                {
                    "runAsNonRoot": BOOLEAN,
                    "runAsUser": ID,
                    "runAsGroup": ID,
                    "fsGroup": ID,
                    "fsGroupChangePolicy": {"enum": ["OnRootMismatch", "Always"]},
                    "supplementalGroups": {"type": "array", "items": ID},
                    "supplementalGroupsPolicy": {"enum": ["Merge", "Strict"]},
                    "seccompProfile": PROFILE,
                    "appArmorProfile": PROFILE,
                    "seLinuxOptions": SE_LINUX,
                    "seLinuxChangePolicy": {"enum": ["MountOption", "Recursive"]},
                    "sysctls": {
                        "type": "array",
                        "items": closed({"name": STRING, "value": STRING}, "name", "value"),
                    },
                    "windowsOptions": WINDOWS,
                }
            ),
            "securityContext": closed(
                {
                    "allowPrivilegeEscalation": BOOLEAN,
                    "readOnlyRootFilesystem": BOOLEAN,
                    "runAsNonRoot": BOOLEAN,
                    "runAsUser": ID,
                    "runAsGroup": ID,
                    "privileged": BOOLEAN,
                    "procMount": {"enum": ["Default", "Unmasked"]},
                    "capabilities": closed(
                        {
                            "add": {"type": "array", "items": STRING},
                            "drop": {"type": "array", "items": STRING},
                        }
                    ),
                    "seccompProfile": PROFILE,
                    "appArmorProfile": PROFILE,
                    "seLinuxOptions": SE_LINUX,
                    "windowsOptions": WINDOWS,
                }
            ),
            "podAnnotations": string_map(QUALIFIED_NAME),
            "podLabels": string_map(
                QUALIFIED_NAME, {"type": "string", "pattern": LABEL_VALUE, "maxLength": 63}
            ),
            "nodeSelector": string_map(QUALIFIED_NAME),
            "tolerations": {"type": "array", "items": toleration},
            "affinity": closed({"nodeAffinity": OBJECT, "podAffinity": OBJECT, "podAntiAffinity": OBJECT}),
            "priorityClassName": {"type": "string", "pattern": rf"^({DNS_SUBDOMAIN[1:-1]})?$"},
        }
    )


def _tidy(node: Any) -> Any:
    """Pydantic's schema as Helm should read it: no generated titles, and a constrained map key
    (pydantic's patternProperties, which let any other key through) as propertyNames."""
    if isinstance(node, list):
        return [_tidy(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _tidy(v) for k, v in node.items() if k != "title"}
    if "patternProperties" in out:
        ((pattern, values),) = out.pop("patternProperties").items()
        out["additionalProperties"] = values
        out["propertyNames"] = {**out.get("propertyNames", {}), "pattern": pattern}
    return out


def values_schema() -> dict[str, Any]:
    settings = _tidy(Settings.model_json_schema(by_alias=True, mode="validation"))
    definitions = settings.pop("$defs")
    settings["description"] = (
        "The operator's settings file (instructune_operator.settings.Settings; docs/operations.md, Settings reference)."
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "Generated by hack/gen_values_schema.py (settings: from instructune_operator.settings). Do not edit.",
        **chart_values(settings),
        "$defs": definitions,  # the settings' own, where pydantic's $refs point
    }


def render() -> str:
    return json.dumps(values_schema(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    return write_or_check([TARGET], render(), argv, "values-schema")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
