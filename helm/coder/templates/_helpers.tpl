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

{{/*
The coder.env entry named by the second argument, as JSON; empty when
coder.env has none. Usage: include "coder.envEntry" (list . "NAME").
*/}}
{{- define "coder.envEntry" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- range $root.Values.coder.env -}}
{{- if eq .name $name -}}{{- toJson . -}}{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Checks coder.env against what the chart sets itself, so that no variable
is emitted twice (a duplicate name makes server-side apply, Argo CD and
Flux reject the Deployment, and which one wins is unclear). Entries that
values written for Coder's own chart use are taken over from coder.env:
CODER_PG_CONNECTION_URL, CODER_ACCESS_URL, CODER_PROMETHEUS_ENABLE and
CODER_PROMETHEUS_ADDRESS. The rest the chart needs as it sets them.
*/}}
{{- define "coder.checkEnv" -}}
{{- $managed := dict
  "CODER_HTTP_ADDRESS" "the chart listens on 0.0.0.0:8080 (probes and Services depend on it)"
  "CODER_ADDRESS" "the chart sets CODER_HTTP_ADDRESS=0.0.0.0:8080"
  "POD_IP" "the chart sets it from status.podIP"
  "CODER_DERP_SERVER_RELAY_URL" "the chart sets http://$(POD_IP):8080"
  "CODER_SHUTDOWN_GRACE_PERIOD" "use coder.shutdownGracePeriod (checked against terminationGracePeriodSeconds)"
  "CODER_CACHE_DIRECTORY" "the chart mounts an emptyDir there"
  "CODER_PG_CONNECTION_URL_FILE" "the chart sets it to the Postgres Secret it mounts (coder.postgres.mountAsFile); give the Secret as coder.postgres.existingSecret"
-}}
{{- $seen := dict -}}
{{- range .Values.coder.env -}}
{{- if hasKey $managed .name -}}
{{- fail (printf "coder.env sets %s, which the chart sets itself: %s" .name (get $managed .name)) -}}
{{- end -}}
{{- if hasKey $seen .name -}}
{{- fail (printf "coder.env lists %s twice" .name) -}}
{{- end -}}
{{- $_ := set $seen .name true -}}
{{- end -}}
{{- if and .Values.coder.accessURL (include "coder.envEntry" (list . "CODER_ACCESS_URL")) -}}
{{- fail "the access URL is given twice (coder.accessURL and CODER_ACCESS_URL in coder.env): keep one" -}}
{{- end -}}
{{- end -}}

{{/*
"true" when the pods serve /metrics: coder.prometheus.enable, or (as in
Coder's chart) CODER_PROMETHEUS_ENABLE with value "true" in coder.env.
*/}}
{{- define "coder.prometheusEnabled" -}}
{{- $env := include "coder.envEntry" (list . "CODER_PROMETHEUS_ENABLE") -}}
{{- if or .Values.coder.prometheus.enable (and $env (eq (toString (fromJson $env).value) "true")) -}}
true
{{- end -}}
{{- end -}}

{{/* The access URL: coder.accessURL, CODER_ACCESS_URL from coder.env (a
plain value), or the Service's cluster DNS name. */}}
{{- define "coder.accessURL" -}}
{{- $env := include "coder.envEntry" (list . "CODER_ACCESS_URL") -}}
{{- if .Values.coder.accessURL -}}
{{- .Values.coder.accessURL -}}
{{- else if and $env (fromJson $env).value -}}
{{- (fromJson $env).value -}}
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
