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

{{/*
The CODER_PG_CONNECTION_URL entry of coder.env, as Coder's own chart takes
the Postgres URL (value, or valueFrom such as a secretKeyRef); empty when
there is none. Fails on an entry without a value or valueFrom.
*/}}
{{- define "coder.postgresEnvEntry" -}}
{{- range .Values.coder.env -}}
{{- if eq .name "CODER_PG_CONNECTION_URL" -}}
{{- if not (or .value .valueFrom) -}}
{{- fail "coder.env entry CODER_PG_CONNECTION_URL has neither value nor valueFrom: give the Postgres URL, e.g. valueFrom.secretKeyRef" -}}
{{- end -}}
{{- toJson . -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Where the Postgres URL comes from: "env" (coder.env carries
CODER_PG_CONNECTION_URL, which the Deployment then does not set again),
"existingSecret" or "url". Exactly one source; fails without one, since every
replica must share one Postgres and the image has no usable built-in one.
*/}}
{{- define "coder.postgresSource" -}}
{{- $pg := .Values.coder.postgres -}}
{{- $sources := list -}}
{{- if include "coder.postgresEnvEntry" . -}}{{- $sources = append $sources "env" -}}{{- end -}}
{{- if $pg.existingSecret.name -}}{{- $sources = append $sources "existingSecret" -}}{{- end -}}
{{- if $pg.url -}}{{- $sources = append $sources "url" -}}{{- end -}}
{{- if eq (len $sources) 0 -}}
{{- fail "the Postgres URL is required: set coder.postgres.url, coder.postgres.existingSecret.name, or a CODER_PG_CONNECTION_URL entry in coder.env (value or valueFrom.secretKeyRef); every replica must share one Postgres" -}}
{{- else if gt (len $sources) 1 -}}
{{- fail (printf "the Postgres URL is given more than once (%s): keep one of coder.postgres.url, coder.postgres.existingSecret.name and CODER_PG_CONNECTION_URL in coder.env" (join ", " $sources)) -}}
{{- end -}}
{{- first $sources -}}
{{- end -}}

{{/* The Secret holding the Postgres URL when the chart sets the variable. */}}
{{- define "coder.postgresSecretName" -}}
{{- if .Values.coder.postgres.existingSecret.name -}}
{{- .Values.coder.postgres.existingSecret.name -}}
{{- else -}}
{{- printf "%s-postgres" (include "coder.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "coder.postgresSecretKey" -}}
{{- if .Values.coder.postgres.existingSecret.name -}}
{{- .Values.coder.postgres.existingSecret.key -}}
{{- else -}}
url
{{- end -}}
{{- end -}}
