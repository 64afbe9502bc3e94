{{/* The chart's name, or nameOverride. */}}
{{- define "sparseserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name: two releases (dense, sparse) never share objects. */}}
{{- define "sparseserve.fullname" -}}
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

{{- define "sparseserve.tritonName" -}}
{{- printf "%s-triton" (include "sparseserve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sparseserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. Call with (dict "ctx" $ "component" "server"). */}}
{{- define "sparseserve.labels" -}}
helm.sh/chart: {{ include "sparseserve.chart" .ctx }}
{{ include "sparseserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{/* The immutable selector. app.kubernetes.io/instance (the release name) is what the
monitors relabel into the Prometheus target label `deployment`. */}}
{{- define "sparseserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sparseserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "sparseserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sparseserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sparseserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The gRPC service whose health readiness asks for: the server's inference API
(sparseserve.server.app.V2_SERVICE), SERVING once the startup models are loaded. */}}
{{- define "sparseserve.readinessService" -}}
inference.GRPCInferenceService
{{- end }}

{{/* Where the ConfigMap is mounted: a directory, never a subPath, so that the kubelet
updates the traffic policy file in place and the server's hot reload sees it. */}}
{{- define "sparseserve.configDir" -}}
/etc/sparseserve
{{- end }}

{{/* The server's settings file: the user's `config` with the chart-owned keys set. */}}
{{- define "sparseserve.serverConfig" -}}
{{- $config := deepCopy .Values.config }}
{{- if .Values.triton.enabled }}
{{- $triton := deepCopy (get $config "triton" | default dict) }}
{{- if hasKey $triton "url" }}
{{- fail "config.triton.url: the chart points sparseserve at its own Triton when triton.enabled; remove config.triton.url, or disable triton to use an external one" }}
{{- end }}
{{- $_ := set $triton "url" (printf "%s:%d" (include "sparseserve.tritonName" .) 8001) }}
{{- $_ := set $config "triton" $triton }}
{{- end }}
{{- $owned := dict
  "repository" .Values.models.mountPath
  "host" "0.0.0.0"
  "grpc_port" (int .Values.ports.grpc)
  "http_port" (int .Values.ports.http)
  "metrics_port" (int .Values.ports.metrics)
  "shutdown_grace_seconds" .Values.shutdown.graceSeconds }}
{{- if .Values.tls.enabled }}
{{- $dir := include "sparseserve.tlsDir" . }}
{{- $_ := set $owned "grpc_tls" (dict
  "enabled" true
  "mutual" .Values.tls.mutual
  "server_cert" (printf "%s/tls.crt" $dir)
  "server_key" (printf "%s/tls.key" $dir)
  "root_cert" (printf "%s/ca.crt" $dir)) }}
{{- end }}
{{- $restrictions := list }}
{{- range $index, $restriction := .Values.restrictedProtocols }}
{{- $restrictions = append $restrictions (dict
  "groups" $restriction.groups
  "key" $restriction.key
  "value_file" (printf "%s/%d/value" (include "sparseserve.protocolKeysDir" $) $index)) }}
{{- end }}
{{- if $restrictions }}
{{- $_ := set $owned "grpc_restricted_protocols" $restrictions }}
{{- /* The REST port is restricted alike (header <key>, not triton-grpc-protocol-<key>):
a restriction that REST did not share would be bypassed through it. */}}
{{- $_ := set $owned "http_restricted_apis" $restrictions }}
{{- end }}
{{- toYaml (mustMergeOverwrite $config $owned) }}
{{- end }}

{{/* Where the TLS Secret is mounted (tls.crt, tls.key, ca.crt). */}}
{{- define "sparseserve.tlsDir" -}}
/etc/sparseserve-tls
{{- end }}

{{/* Where each restriction's value is mounted: <dir>/<index>/value. */}}
{{- define "sparseserve.protocolKeysDir" -}}
/etc/sparseserve-protocol-keys
{{- end }}

{{/* The Secret the chart generates for restrictions without existingSecret. */}}
{{- define "sparseserve.protocolKeysSecret" -}}
{{- printf "%s-protocol-keys" (include "sparseserve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "true" when the probes must run `sparseserve health` in the container: the
kubelet's own gRPC probe speaks only plaintext and sends no headers, so it cannot
reach a TLS port or a restricted health group. */}}
{{- define "sparseserve.execProbes" -}}
{{- $exec := .Values.tls.enabled }}
{{- range .Values.restrictedProtocols }}
{{- if has "health" .groups }}
{{- $exec = true }}
{{- end }}
{{- end }}
{{- if $exec }}true{{ end }}
{{- end }}

{{/* One probe's check. Call with (dict "ctx" $ "service" "" "timing" .Values.probes.x). */}}
{{- define "sparseserve.probe" -}}
{{- $ctx := .ctx }}
{{- if include "sparseserve.execProbes" $ctx }}
exec:
  command:
    - sparseserve
    - health
    - --config
    - {{ include "sparseserve.configDir" $ctx }}/config.yaml
    - --service
    - {{ .service | quote }}
    {{- if $ctx.Values.tls.enabled }}
    - --server-name
    - {{ default (include "sparseserve.fullname" $ctx) $ctx.Values.tls.serverName }}
    {{- end }}
    - --timeout
    - {{ .timing.timeoutSeconds | quote }}
{{- with .timing }}
periodSeconds: {{ .periodSeconds }}
failureThreshold: {{ .failureThreshold }}
# A process start (about a second of CPU) on top of the call.
timeoutSeconds: {{ add .timeoutSeconds 3 }}
{{- end }}
{{- else }}
grpc:
  port: {{ $ctx.Values.ports.grpc }}
  service: {{ .service | quote }}
{{- toYaml .timing | nindent 0 }}
{{- end }}
{{- end }}

{{/* The model repository volume, shared by sparseserve and Triton. */}}
{{- define "sparseserve.modelVolume" -}}
{{- if eq .Values.models.source "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ required "models.pvc.claimName is required when models.source is pvc" .Values.models.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.models.source "image" }}
- name: models
  emptyDir:
    sizeLimit: {{ .Values.models.image.sizeLimit }}
{{- end }}
{{- end }}

{{- define "sparseserve.modelVolumeMount" -}}
{{- if ne .Values.models.source "baked" }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
  {{- if and (eq .Values.models.source "pvc") .Values.models.pvc.subPath }}
  subPath: {{ .Values.models.pvc.subPath }}
  {{- end }}
{{- end }}
{{- end }}

{{/* models.source image: copy the repository out of the models image before start. */}}
{{- define "sparseserve.modelInitContainer" -}}
{{- if eq .Values.models.source "image" }}
- name: copy-models
  image: {{ printf "%s:%s" (required "models.image.repository is required when models.source is image" .Values.models.image.repository) .Values.models.image.tag }}
  imagePullPolicy: {{ .Values.models.image.pullPolicy }}
  command: ["cp", "-R", "{{ trimSuffix "/" .Values.models.image.path }}/.", "/repository/"]
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    requests:
      cpu: 100m
      memory: 64Mi
    limits:
      memory: 256Mi
  volumeMounts:
    - name: models
      mountPath: /repository
{{- end }}
{{- end }}

{{/* "true" when the server serves v2 REST (config.allow_http, default true; sprig's
`default` would turn an explicit false into true, hence hasKey). */}}
{{- define "sparseserve.httpEnabled" -}}
{{- if or (not (hasKey .Values.config "allow_http")) .Values.config.allow_http }}true{{ end }}
{{- end }}
