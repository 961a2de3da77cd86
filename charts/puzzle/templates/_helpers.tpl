{{/* Names and labels shared by every template. */}}

{{- define "puzzle.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "puzzle.fullname" -}}
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

{{- define "puzzle.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "puzzle.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: puzzle
{{- end }}

{{- define "puzzle.selectorLabels" -}}
app.kubernetes.io/name: {{ include "puzzle.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "puzzle.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "puzzle.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespace KFP runs are submitted to (the Kubeflow profile). */}}
{{- define "puzzle.kfpNamespace" -}}
{{- default .Release.Namespace .Values.kfp.namespace }}
{{- end }}

{{- define "puzzle.image" -}}
{{- $ref := printf "%s/%s:%s" (trimSuffix "/" .Values.image.registry) .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $ref .Values.image.digest }}
{{- else }}
{{- $ref }}
{{- end }}
{{- end }}

{{/* Secret names: the referenced existing Secret, or the one the chart creates. */}}
{{- define "puzzle.webhookSecretName" -}}
{{- if .Values.secrets.webhook.existingSecret }}
{{- .Values.secrets.webhook.existingSecret }}
{{- else if .Values.secrets.webhook.create }}
{{- printf "%s-webhook" (include "puzzle.fullname" .) }}
{{- else }}
{{- fail "secrets.webhook: set existingSecret to the name of a Secret holding the webhook secret, or create: true" }}
{{- end }}
{{- end }}

{{- define "puzzle.s3SecretName" -}}
{{- if .Values.secrets.s3.existingSecret }}
{{- .Values.secrets.s3.existingSecret }}
{{- else if .Values.secrets.s3.create }}
{{- printf "%s-s3" (include "puzzle.fullname" .) }}
{{- end }}
{{- end }}

{{- define "puzzle.mlflowSecretName" -}}
{{- if .Values.secrets.mlflow.existingSecret }}
{{- .Values.secrets.mlflow.existingSecret }}
{{- else if .Values.secrets.mlflow.create }}
{{- printf "%s-mlflow" (include "puzzle.fullname" .) }}
{{- end }}
{{- end }}

{{- define "puzzle.webhookUrl" -}}
{{- if .Values.setup.webhook.url }}
{{- .Values.setup.webhook.url }}
{{- else }}
{{- printf "http://%s.%s.svc.cluster.local:%d/webhook" (include "puzzle.fullname" .) .Release.Namespace (int .Values.service.port) }}
{{- end }}
{{- end }}


{{/*
Environment of the trigger service and the setup Job's steps: the KFP endpoint and token, MLflow,
S3, and credentials from Secrets (never literal values). Called with (dict "root" $ "needs" LIST):
"kfp" adds the KFP token path, "s3" the S3 keys, "mlflow" the MLflow credentials; settings that
are not secret (endpoints, region, HOME) are always there.
*/}}
{{- define "puzzle.env" -}}
{{- $root := .root }}
{{- $needs := .needs }}
- name: KF_PIPELINES_ENDPOINT
  value: {{ $root.Values.kfp.host | quote }}
- name: PUZZLE_KFP_NAMESPACE
  value: {{ include "puzzle.kfpNamespace" $root | quote }}
{{- if and $root.Values.kfp.token.enabled (has "kfp" $needs) }}
- name: KF_PIPELINES_SA_TOKEN_PATH
  value: /var/run/secrets/kubeflow/pipelines/token
{{- end }}
- name: MLFLOW_TRACKING_URI
  value: {{ $root.Values.mlflow.trackingUri | quote }}
{{- with $root.Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: AWS_DEFAULT_REGION
  value: {{ $root.Values.s3.region | quote }}
{{- if has "s3" $needs }}
{{- with include "puzzle.s3SecretName" $root }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.secrets.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.secrets.s3.secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- if has "mlflow" $needs }}
{{- with include "puzzle.mlflowSecretName" $root }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.secrets.mlflow.usernameKey }}
      optional: true
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.secrets.mlflow.passwordKey }}
      optional: true
- name: MLFLOW_TRACKING_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.secrets.mlflow.tokenKey }}
      optional: true
{{- end }}
{{- end }}
- name: HOME
  value: /tmp
- name: PUZZLE_CACHE_DIR
  value: /tmp/puzzle-cache
{{- end }}

{{/* Everything the trigger service uses. */}}
{{- define "puzzle.triggerNeeds" -}}
{{- toJson (list "kfp" "s3" "mlflow" "webhook" "profiles") }}
{{- end }}

{{/* Volumes of a pod whose containers use (dict "root" $ "needs" LIST): scratch space always. */}}
{{- define "puzzle.volumes" -}}
{{- $root := .root }}
{{- $needs := .needs }}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- if has "profiles" $needs }}
- name: profiles
  configMap:
    name: {{ include "puzzle.fullname" $root }}-profiles
{{- end }}
{{- if has "webhook" $needs }}
- name: webhook-secret
  secret:
    secretName: {{ include "puzzle.webhookSecretName" $root }}
    defaultMode: 0440
    items:
      - key: {{ $root.Values.secrets.webhook.key }}
        path: secret
{{- end }}
{{- if and $root.Values.kfp.token.enabled (has "kfp" $needs) }}
- name: kfp-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          audience: {{ $root.Values.kfp.token.audience | quote }}
          expirationSeconds: {{ int $root.Values.kfp.token.expirationSeconds }}
{{- end }}
{{- end }}

{{- define "puzzle.volumeMounts" -}}
{{- $root := .root }}
{{- $needs := .needs }}
- name: tmp
  mountPath: /tmp
{{- if has "profiles" $needs }}
- name: profiles
  mountPath: /etc/puzzle/profiles
  readOnly: true
{{- end }}
{{- if has "webhook" $needs }}
- name: webhook-secret
  mountPath: /var/run/secrets/puzzle/webhook
  readOnly: true
{{- end }}
{{- if and $root.Values.kfp.token.enabled (has "kfp" $needs) }}
- name: kfp-token
  mountPath: /var/run/secrets/kubeflow/pipelines
  readOnly: true
{{- end }}
{{- end }}

{{/* One step of the setup Job: a `puzzle` command in the shared container settings. */}}
{{- define "puzzle.setupContainer" -}}
{{- $root := .root }}
name: {{ .step.name }}
image: {{ include "puzzle.image" $root }}
imagePullPolicy: {{ $root.Values.image.pullPolicy }}
command: [puzzle]
args:
  {{- range .step.args }}
  - {{ . | quote }}
  {{- end }}
env:
  {{- include "puzzle.env" (dict "root" $root "needs" .step.needs) | nindent 2 }}
securityContext:
  {{- toYaml $root.Values.securityContext | nindent 2 }}
resources:
  {{- toYaml $root.Values.setup.resources | nindent 2 }}
volumeMounts:
  {{- include "puzzle.volumeMounts" (dict "root" $root "needs" .step.needs) | nindent 2 }}
{{- end }}
