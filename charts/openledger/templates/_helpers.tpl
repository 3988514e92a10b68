{{/* Chart name. */}}
{{- define "openledger.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "openledger.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "openledger.operator.fullname" -}}
{{- printf "%s-operator" (include "openledger.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. */}}
{{- define "openledger.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "openledger.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: openledger
{{- end }}

{{- define "openledger.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "openledger.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "openledger.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "openledger.operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "openledger.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* RBAC rules of the operator on the objects it manages (no wildcards). */}}
{{- define "openledger.operator.rules" }}
# The product's own kinds: watch them, keep our finalizer, write their status.
- apiGroups: ["openledger.io"]
  resources: ["models", "agents", "rewardpools"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["openledger.io"]
  resources: ["models/status", "agents/status", "rewardpools/status"]
  verbs: ["get", "patch", "update"]
# Model -> KServe InferenceService (created, repaired, deleted by the Model controller).
- apiGroups: ["serving.kserve.io"]
  resources: ["inferenceservices"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# Agent credentials (created by the Agent controller); chain RPC URL and signer key (read by the RewardPool controller).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "update"]
# Events on the objects for every meaningful transition.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
