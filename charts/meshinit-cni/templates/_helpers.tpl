{{/* The name of every object of this release. */}}
{{- define "meshinit-cni.name" -}}
{{- printf "%s-meshinit-cni" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshinit-cni.labels" -}}
app.kubernetes.io/name: meshinit-cni
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "meshinit-cni.platformKnown" -}}
{{- if not (has .Values.platform (list "" "gke" "openshift")) -}}
{{- fail (printf "platform %q is not one of \"\", gke, openshift; set cniBinDir and cniConfDir instead" .Values.platform) -}}
{{- end -}}
{{- end -}}

{{/* The host's CNI plugin directory: cniBinDir, else the platform's. */}}
{{- define "meshinit-cni.binDir" -}}
{{- include "meshinit-cni.platformKnown" . -}}
{{- if .Values.cniBinDir -}}{{ .Values.cniBinDir }}
{{- else if eq .Values.platform "gke" -}}/home/kubernetes/bin
{{- else if eq .Values.platform "openshift" -}}/var/lib/cni/bin
{{- else -}}/opt/cni/bin
{{- end -}}
{{- end -}}

{{/* The host's CNI configuration directory: cniConfDir, else the platform's. */}}
{{- define "meshinit-cni.confDir" -}}
{{- if .Values.cniConfDir -}}{{ .Values.cniConfDir }}
{{- else if eq .Values.platform "openshift" -}}/etc/cni/multus/net.d
{{- else -}}/etc/cni/net.d
{{- end -}}
{{- end -}}

{{- define "meshinit-cni.chained" -}}
{{- if eq .Values.platform "openshift" -}}false{{- else -}}{{ .Values.chained }}{{- end -}}
{{- end -}}

{{/* proxyEnv as the agent's --proxy-env list: KEY=VALUE,... in key order. */}}
{{- define "meshinit-cni.proxyEnv" -}}
{{- $pairs := list -}}
{{- range $key := keys .Values.proxyEnv | sortAlpha -}}
{{- $pairs = append $pairs (printf "%s=%s" $key (toString (get $.Values.proxyEnv $key))) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
