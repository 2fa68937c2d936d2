{{/*
Names, labels, image, addresses and TLS wiring shared by the templates.
*/}}

{{- define "meshlite.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name prefix; component names are appended, so keep it short enough for them. */}}
{{- define "meshlite.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "meshlite.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "meshlite.labels" -}}
helm.sh/chart: {{ include "meshlite.chart" . }}
app.kubernetes.io/name: {{ include "meshlite.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshlite
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "control-plane"). */}}
{{- define "meshlite.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshlite.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects. */}}
{{- define "meshlite.componentLabels" -}}
{{ include "meshlite.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "meshlite.controlPlane.name" -}}{{ include "meshlite.fullname" . }}-control-plane{{- end }}
{{- define "meshlite.nodeAgent.name" -}}{{ include "meshlite.fullname" . }}-node-agent{{- end }}
{{- define "meshlite.dnsAgent.name" -}}{{ include "meshlite.fullname" . }}-dns-agent{{- end }}
{{- define "meshlite.dnsService.name" -}}{{ include "meshlite.fullname" . }}-dns{{- end }}
{{- define "meshlite.ca.name" -}}{{ include "meshlite.fullname" . }}-ca{{- end }}

{{- define "meshlite.image" -}}
{{- $img := .Values.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/*
The URL agents dial: controlPlane.endpoint, else the Service by fixed clusterIP, else by DNS name.
*/}}
{{- define "meshlite.controlPlane.url" -}}
{{- $cp := .Values.controlPlane }}
{{- if $cp.endpoint }}
{{- $cp.endpoint }}
{{- else if $cp.service.clusterIP }}
{{- if contains ":" $cp.service.clusterIP }}
{{- printf "https://[%s]:%d" $cp.service.clusterIP (int $cp.grpcPort) }}
{{- else }}
{{- printf "https://%s:%d" $cp.service.clusterIP (int $cp.grpcPort) }}
{{- end }}
{{- else }}
{{- printf "https://%s.%s.svc:%d" (include "meshlite.controlPlane.name" .) .Release.Namespace (int $cp.grpcPort) }}
{{- end }}
{{- end }}

{{/* Host part of controlPlane.endpoint (empty when unset). */}}
{{- define "meshlite.controlPlane.endpointHost" -}}
{{- with .Values.controlPlane.endpoint }}
{{- $rest := trimPrefix "https://" . }}
{{- $hostport := first (splitList "/" $rest) }}
{{- if hasPrefix "[" $hostport }}
{{- trimPrefix "[" (first (splitList "]" $hostport)) }}
{{- else }}
{{- first (splitList ":" $hostport) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Names the control plane server certificate carries, as JSON {"dns": [...], "ips": [...]}.
*/}}
{{- define "meshlite.controlPlane.sans" -}}
{{- $svc := include "meshlite.controlPlane.name" . }}
{{- $ns := .Release.Namespace }}
{{- $dns := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) }}
{{- $ips := list }}
{{- with .Values.controlPlane.service.clusterIP }}
{{- $ips = append $ips . }}
{{- end }}
{{- with include "meshlite.controlPlane.endpointHost" . }}
{{- if regexMatch "^[0-9.]+$|:" . }}
{{- $ips = append $ips . }}
{{- else }}
{{- $dns = append $dns . }}
{{- end }}
{{- end }}
{{- dict "dns" ($dns | uniq) "ips" ($ips | uniq) | toJson }}
{{- end }}

{{/* Which certificate source is used: generate, certManager or existing. */}}
{{- define "meshlite.tls.source" -}}
{{- $ex := .Values.tls.existingSecrets }}
{{- if .Values.certManager.enabled }}certManager
{{- else if or $ex.controlPlane $ex.nodeAgent $ex.dnsAgent }}existing
{{- else }}generate
{{- end }}
{{- end }}

{{/* Secret holding one component's certificate: (dict "ctx" $ "component" "controlPlane"). */}}
{{- define "meshlite.tls.secretName" -}}
{{- $existing := index .ctx.Values.tls.existingSecrets .component }}
{{- if and (eq (include "meshlite.tls.source" .ctx) "existing") $existing }}
{{- $existing }}
{{- else }}
{{- printf "%s-%s-tls" (include "meshlite.fullname" .ctx) (.component | kebabcase) }}
{{- end }}
{{- end }}

{{/* OTel env vars of a container; include only when otel.endpoint is set. (dict "ctx" $ "service" "meshlite-node-agent") */}}
{{- define "meshlite.otelEnv" -}}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .ctx.Values.otel.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
{{- end }}

{{/* Prometheus scrape annotations for a pod. (dict "ctx" $ "port" 9590) */}}
{{- define "meshlite.scrapeAnnotations" -}}
{{- if .ctx.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* Pod anti-affinity by hostname. (dict "ctx" $ "component" "dns-agent" "mode" "preferred") */}}
{{- define "meshlite.antiAffinity" -}}
{{- if eq .mode "required" -}}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "meshlite.selectorLabels" . | nindent 10 }}
{{- else if eq .mode "preferred" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "meshlite.selectorLabels" . | nindent 12 }}
{{- end }}
{{- end }}

{{/*
Deployment rollout: surge a new pod before removing an old one, unless pods must be on
distinct nodes (required anti-affinity), where a surge pod may find no node: then replace
one at a time. Argument: the antiAffinity value.
*/}}
{{- define "meshlite.rollingUpdate" -}}
type: RollingUpdate
rollingUpdate:
{{- if eq . "required" }}
  maxSurge: 0
  maxUnavailable: 1
{{- else }}
  maxSurge: 1
  maxUnavailable: 0
{{- end }}
{{- end }}

{{/* Volume with one component's TLS Secret, keys readable by the pod's fsGroup only. */}}
{{- define "meshlite.tls.volume" -}}
- name: tls
  secret:
    secretName: {{ include "meshlite.tls.secretName" . }}
    defaultMode: 288 # 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      - key: ca.crt
        path: ca.crt
{{- end }}

{{/* Where the TLS Secret is mounted. */}}
{{- define "meshlite.tls.dir" -}}/etc/meshlite/tls{{- end }}

{{/* "true" when node agents prove their node with a ServiceAccount token: identity.mode
serviceAccountToken, or auto on Kubernetes 1.30+ (where bound tokens name their node). */}}
{{- define "meshlite.identity.tokenMode" -}}
{{- $m := .Values.identity.mode }}
{{- if or (eq $m "serviceAccountToken") (and (eq $m "auto") (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version)) -}}
true
{{- end }}
{{- end }}

{{/* The node identity in effect, for NOTES. */}}
{{- define "meshlite.identity.effective" -}}
{{- if include "meshlite.identity.tokenMode" . -}}serviceAccountToken{{- else -}}certificate{{- end }}
{{- end }}

{{/* Where the projected identity token is mounted (token mode). */}}
{{- define "meshlite.identity.tokenDir" -}}/var/run/secrets/meshlite/identity{{- end }}

{{/* The node agent's --detect-local-mode: the value, else ClusterCIDR with a clusterCIDR, else NodeCIDR. */}}
{{- define "meshlite.nodeAgent.detectLocalMode" -}}
{{- $na := .Values.nodeAgent }}
{{- if $na.detectLocalMode }}{{ $na.detectLocalMode }}{{ else if $na.clusterCIDR }}ClusterCIDR{{ else }}NodeCIDR{{ end }}
{{- end }}

{{/* Checks across values that the schema cannot express; fails rendering with a clear message. */}}
{{- define "meshlite.validate" -}}
{{- $v := .Values }}
{{- $mode := include "meshlite.nodeAgent.detectLocalMode" . }}
{{- if and (eq $mode "ClusterCIDR") (not $v.nodeAgent.clusterCIDR) }}
{{- fail "nodeAgent.clusterCIDR is required with nodeAgent.detectLocalMode=ClusterCIDR: set it to the cluster's pod CIDR(s), e.g. --set 'nodeAgent.clusterCIDR={10.244.0.0/16}', or use another detectLocalMode" }}
{{- end }}
{{- if and (eq $mode "BridgeInterface") (not $v.nodeAgent.podBridgeInterface) }}
{{- fail "nodeAgent.podBridgeInterface is required with nodeAgent.detectLocalMode=BridgeInterface, e.g. --set nodeAgent.podBridgeInterface=cbr0" }}
{{- end }}
{{- if and (eq $mode "InterfaceNamePrefix") (not $v.nodeAgent.podInterfaceNamePrefix) }}
{{- fail "nodeAgent.podInterfaceNamePrefix is required with nodeAgent.detectLocalMode=InterfaceNamePrefix, e.g. --set nodeAgent.podInterfaceNamePrefix=eni" }}
{{- end }}
{{- if and (eq $v.identity.mode "serviceAccountToken") (semverCompare "<1.30.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "identity.mode=serviceAccountToken needs Kubernetes 1.30 or newer, where bound ServiceAccount tokens name their node (ServiceAccountTokenPodNodeInfo); this cluster is %s" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- $ex := $v.tls.existingSecrets }}
{{- $nExisting := len (compact (list $ex.controlPlane $ex.nodeAgent $ex.dnsAgent)) }}
{{- if and $v.certManager.enabled (gt $nExisting 0) }}
{{- fail "certManager.enabled and tls.existingSecrets are mutually exclusive: choose one source of certificates" }}
{{- end }}
{{- if and (gt $nExisting 0) (lt $nExisting 3) }}
{{- fail "tls.existingSecrets: set all three of controlPlane, nodeAgent and dnsAgent (or none to let the chart generate certificates)" }}
{{- end }}
{{- end }}

{{/* The pod CIDRs the DNS agents answer reverse lookups for (dns.podCIDRs, else nodeAgent.clusterCIDR), comma separated. */}}
{{- define "meshlite.dns.podCIDRs" -}}
{{- join "," (.Values.dns.podCIDRs | default .Values.nodeAgent.clusterCIDR) -}}
{{- end }}

{{/*
The service CIDRs the DNS agents answer reverse lookups for, comma separated: dns.serviceCIDRs,
else the `spec.cidrs` of the cluster's ServiceCIDR objects (networking.k8s.io/v1, Kubernetes
1.33+) when helm can read them; rendering fails when neither gives any.
*/}}
{{- define "meshlite.dns.serviceCIDRs" -}}
{{- $cidrs := .Values.dns.serviceCIDRs | default list }}
{{- if and (not $cidrs) (.Capabilities.APIVersions.Has "networking.k8s.io/v1/ServiceCIDR") }}
{{- range (lookup "networking.k8s.io/v1" "ServiceCIDR" "" "").items | default list }}
{{- $cidrs = concat $cidrs (.spec.cidrs | default list) }}
{{- end }}
{{- end }}
{{- if not $cidrs }}
{{- fail "dns.serviceCIDRs is required: set it to the cluster's service CIDR(s), e.g. --set 'dns.serviceCIDRs={10.96.0.0/12}' (on Kubernetes 1.33+ it is read from the ServiceCIDR objects when helm can reach the cluster)" }}
{{- end }}
{{- join "," (uniq $cidrs) -}}
{{- end }}
