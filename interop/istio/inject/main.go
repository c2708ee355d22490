// istio-inject-oracle: Istio's real sidecar injector (pkg/kube/inject) with the injection
// templates and values of Istio's own charts, driven the way Istio's injection tests drive it
// (pkg/kube/inject/inject_test.go: the chart rendered by the operator's renderer with
// profile=empty and pilot on, then kube-inject's IntoResourceFile). A separate command from
// istio-oracle, because the injector pulls in the Kubernetes client and Helm: the rules
// oracle stays small and quick to build.
//
//	istio-inject-oracle < request.json > injected.yaml
//
// The request is one JSON object:
//
//	{"yaml": "<Pod, Deployment, ... as YAML>",
//	 "set": ["values.global.proxy_init.image=meshinit", "meshConfig.defaultConfig.interceptionMode=TPROXY"],
//	 "files": ["/path/to/IstioOperator-or-values.yaml"],
//	 "charts": "<the istio.io/istio module>/manifests"}
//
// "set" takes istioctl's --set paths (values.*, meshConfig.*, components.*); "files" takes
// IstioOperator files such as meshinit's injector-template/istio-operator.yaml. The injected
// resources are printed as kube-inject prints them, with the status annotation's version
// stripped as Istio's test does.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	corev1 "k8s.io/api/core/v1"

	meshconfig "istio.io/api/mesh/v1alpha1"

	"istio.io/istio/operator/pkg/render"
	"istio.io/istio/pilot/test/util"
	"istio.io/istio/pkg/config/mesh"
	"istio.io/istio/pkg/kube"
	"istio.io/istio/pkg/kube/inject"
	"istio.io/istio/pkg/log"
)

type request struct {
	YAML  string   `json:"yaml"`
	Set   []string `json:"set"`
	Files []string `json:"files"`
	// Charts is Istio's manifests directory: the pinned module's (build.sh records where
	// the module is), so the templates are the ones released with this injector.
	Charts string `json:"charts"`
}

// injector is what kube-inject needs of a cluster: none; Istio's test passes a fake client.
type injector struct{ client kube.Client }

func (injector) Inject(*corev1.Pod, string) ([]byte, error) { return nil, nil }
func (i injector) GetKubeClient() kube.Client               { return i.client }

func main() {
	opts := log.DefaultOptions()
	opts.OutputPaths = []string{"stderr"}
	opts.SetDefaultOutputLevel(log.DefaultScopeName, log.NoneLevel)
	if err := log.Configure(opts); err != nil {
		fail(err)
	}
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fail(fmt.Errorf("request: %w", err))
	}
	out, err := run(req)
	if err != nil {
		fail(err)
	}
	if _, err := os.Stdout.Write(out); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "istio-inject-oracle:", err)
	os.Exit(1)
}

func run(req request) ([]byte, error) {
	if req.Charts == "" {
		return nil, fmt.Errorf("request: no charts directory")
	}
	templates, values, meshCfg, err := settings(req.Charts, req.Set, req.Files)
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	var warnings []string
	warn := func(s string) { warnings = append(warnings, s) }
	inj := injector{client: kube.NewFakeClient()}
	if err := inject.IntoResourceFile(inj, templates.Templates, values, "", meshCfg,
		strings.NewReader(req.YAML), &out, warn); err != nil {
		return nil, err
	}
	for _, w := range warnings {
		fmt.Fprintln(os.Stderr, "istio-inject-oracle: warning:", w)
	}
	return util.StripVersion(out.Bytes()), nil
}

// settings is getInjectionSettings of Istio's webhook_test.go: the charts rendered into the
// istio-sidecar-injector and istio ConfigMaps, read back as the injector reads them.
func settings(charts string, set, files []string) (*inject.Config, inject.ValuesConfig, *meshconfig.MeshConfig, error) {
	flags := append([]string{}, set...)
	flags = append(flags, "installPackagePath="+charts, "profile=empty", "components.pilot.enabled=true")
	manifests, _, err := render.GenerateManifest(files, flags, false, nil, nil)
	if err != nil {
		return nil, inject.ValuesConfig{}, nil, fmt.Errorf("rendering the charts: %w", err)
	}
	var cfg *inject.Config
	var values inject.ValuesConfig
	meshCfg := mesh.DefaultMeshConfig()
	for _, set := range manifests {
		for _, o := range set.Manifests {
			if o.GetKind() != "ConfigMap" {
				continue
			}
			data, _ := o.Object["data"].(map[string]any)
			switch o.GetName() {
			case "istio-sidecar-injector":
				raw, _ := data["config"].(string)
				vs, _ := data["values"].(string)
				if values, err = inject.NewValuesConfig(vs); err != nil {
					return nil, values, nil, err
				}
				c, err := inject.UnmarshalConfig([]byte(raw))
				if err != nil {
					return nil, values, nil, err
				}
				cfg = &c
			case "istio":
				meshData, _ := data["mesh"].(string)
				if meshCfg, err = mesh.ApplyMeshConfig(meshData, mesh.DefaultMeshConfig()); err != nil {
					return nil, values, nil, err
				}
			}
		}
	}
	if cfg == nil {
		return nil, values, nil, fmt.Errorf("the charts rendered no istio-sidecar-injector ConfigMap")
	}
	return cfg, values, meshCfg, nil
}
