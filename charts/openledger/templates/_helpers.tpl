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
# Secrets, only what the code does: the Agent controller watches its labelled credentials
# Secrets (list, watch), reads, creates and repairs them (merge patch); the RewardPool
# controller reads its chain RPC URL and signer key. No update; no delete: a revoked
# Agent's Secret goes with its owner reference (garbage collector).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Owner references with blockOwnerDeletion on what Models and Agents own (InferenceService,
# credentials Secret): the OwnerReferencesPermissionEnforcement admission plugin (OpenShift)
# refuses them without update on the owner's finalizers.
- apiGroups: ["openledger.io"]
  resources: ["models/finalizers", "agents/finalizers"]
  verbs: ["update"]
# Events on the objects for every meaningful transition.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{- define "openledger.selectorLabels" -}}
app.kubernetes.io/name: {{ include "openledger.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "openledger.component.fullname" -}}
{{- printf "%s-%s" (include "openledger.fullname" .ctx) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* OPENLEDGER_REDIS_URL: from the existing Secret, else the plain value. */}}
{{- define "openledger.redisEnv" -}}
{{- if .Values.redis.existingSecret.name -}}
- name: OPENLEDGER_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret.name }}
      key: {{ .Values.redis.existingSecret.key }}
{{- else -}}
- name: OPENLEDGER_REDIS_URL
  value: {{ required "redis.url or redis.existingSecret.name is required" .Values.redis.url | quote }}
{{- end }}
{{- end }}

{{/* OPENLEDGER_DATABASE_URL: only ever from the existing Secret. */}}
{{- define "openledger.databaseEnv" -}}
- name: OPENLEDGER_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "database.existingSecret.name is required (a Secret holding the PostgreSQL URL)" .Values.database.existingSecret.name }}
      key: {{ .Values.database.existingSecret.key }}
{{- end }}

{{- define "openledger.hasRedisTls" -}}
{{- if or .Values.redis.tls.caSecret.name .Values.redis.tls.clientSecret.name }}true{{ end }}
{{- end }}

{{/* Redis TLS material, mounted where the rediss:// URL's ssl_* parameters point. */}}
{{- define "openledger.redisTlsVolume" -}}
{{- if include "openledger.hasRedisTls" . -}}
- name: redis-tls
  projected:
    sources:
      {{- with .Values.redis.tls.caSecret.name }}
      - secret:
          name: {{ . }}
          items:
            - key: {{ $.Values.redis.tls.caSecret.key }}
              path: ca.crt
      {{- end }}
      {{- with .Values.redis.tls.clientSecret.name }}
      - secret:
          name: {{ . }}
          items:
            - key: tls.crt
              path: tls.crt
            - key: tls.key
              path: tls.key
      {{- end }}
{{- end }}
{{- end }}

{{- define "openledger.redisTlsMount" -}}
{{- if include "openledger.hasRedisTls" . -}}
- name: redis-tls
  mountPath: /etc/openledger/redis-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "openledger.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "openledger.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Init container: wait until PostgreSQL has this version's schema (the migration hook made it). */}}
{{- define "openledger.dbWaitInit" -}}
- name: wait-for-schema
  image: {{ include "openledger.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["openledger"]
  args: ["db", "wait", "--timeout", {{ .Values.database.waitTimeoutSeconds | quote }}]
  env:
    {{- include "openledger.databaseEnv" . | nindent 4 }}
    - name: OPENLEDGER_LOG_FORMAT
      value: text
  resources:
    requests:
      cpu: 10m
      memory: 64Mi
    limits:
      memory: 192Mi
  securityContext:
    {{- include "openledger.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
{{- end }}
