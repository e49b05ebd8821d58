{{/* The release's full name, capped at 63 characters. */}}
{{- define "coder.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select this release's pods (and only them). */}}
{{- define "coder.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "coder.labels" -}}
{{ include "coder.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "coder.serviceAccountName" -}}
{{- if .Values.coder.serviceAccount.create -}}
{{- default (include "coder.fullname" .) .Values.coder.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.coder.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The access URL: the value, or the Service's cluster DNS name. */}}
{{- define "coder.accessURL" -}}
{{- if .Values.coder.accessURL -}}
{{- .Values.coder.accessURL -}}
{{- else -}}
{{- printf "http://%s.%s.svc.cluster.local" (include "coder.fullname" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* The Secret and key holding the Postgres URL; fails without one. */}}
{{- define "coder.postgresSecretName" -}}
{{- if .Values.coder.postgres.existingSecret.name -}}
{{- .Values.coder.postgres.existingSecret.name -}}
{{- else if .Values.coder.postgres.url -}}
{{- printf "%s-postgres" (include "coder.fullname" .) -}}
{{- else -}}
{{- fail "coder.postgres.url or coder.postgres.existingSecret.name is required: every replica must share one Postgres" -}}
{{- end -}}
{{- end -}}

{{- define "coder.postgresSecretKey" -}}
{{- if .Values.coder.postgres.existingSecret.name -}}
{{- .Values.coder.postgres.existingSecret.key -}}
{{- else -}}
url
{{- end -}}
{{- end -}}
