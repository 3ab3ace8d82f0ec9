{{/* Chart name, fullname and labels. */}}
{{- define "instructune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "instructune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "instructune.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "instructune.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "instructune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "instructune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "instructune.labels" -}}
{{ include "instructune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: instructune
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The settings file: .Values.settings without empty strings and nulls (the operator's defaults apply). */}}
{{- define "instructune.settings" -}}
{{- $settings := dict -}}
{{- range $key, $value := .Values.settings -}}
{{- if not (or (kindIs "invalid" $value) (and (kindIs "string" $value) (eq $value ""))) -}}
{{- $_ := set $settings $key $value -}}
{{- end -}}
{{- end -}}
{{- toYaml $settings -}}
{{- end -}}

{{/* The port of the operator's /metrics endpoint: settings.metricsPort, else the operator's own default. */}}
{{- define "instructune.metricsPort" -}}
{{- if hasKey .Values.settings "metricsPort" -}}
{{- .Values.settings.metricsPort | int -}}
{{- else -}}
8080
{{- end -}}
{{- end -}}

{{/*
The operator's RBAC rules, derived from what the code calls (docs/operations.md explains each):
Kopf watches and patches the tunes and their status and posts events, and watches the tunes'
RayClusters and Ray pods into in-memory indices; reconcile server-side applies (PATCH; creating
needs `create` as well) the children, reads the serving Deployment, and deletes the RayCluster
and, after its TTL, the tune.
*/}}
{{- define "instructune.rules" -}}
# get: reconcile reads the tune afresh when its job has just succeeded (the job's last status
# patch may be newer than the watch event being handled).
- apiGroups: [instructune.io]
  resources: [instructiontunes]
  verbs: [get, list, watch, patch, delete]
# get+patch on status is what the per-tune job Roles grant: RBAC lets the operator create those
# Roles and their RoleBindings only because it holds these permissions itself (no escalate/bind).
- apiGroups: [instructune.io]
  resources: [instructiontunes/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [ray.io]
  resources: [rayclusters]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [serviceaccounts, configmaps, services]
  verbs: [create, patch]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [create, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, create, patch]
# Each Ray cluster's NetworkPolicy (server-side apply).
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
{{- if .Values.rayAuth.enabled }}
# rayAuth: each tune's Ray token Secret is applied (server-side apply: PATCH, and create), never read.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, patch]
{{- end }}
{{- if .Values.settings.localJobIdentityDir }}
# localJobIdentityDir: jobs outside the cluster get their tune's ServiceAccount token (TokenRequest).
- apiGroups: [""]
  resources: [serviceaccounts/token]
  verbs: [create]
{{- end }}
{{- if .Values.rbac.ownerReferencesPermissionEnforcement }}
# OwnerReferencesPermissionEnforcement: setting ownerReferences needs delete on the child,
# blockOwnerDeletion needs update on the owner's finalizers.
- apiGroups: [instructune.io]
  resources: [instructiontunes/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [serviceaccounts, configmaps, services]
  verbs: [delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [delete]
{{- end }}
{{- end -}}
