module meshinit.dev/interop/istio

// Istio's goldens (../shared/istio-golden, README "Parity with Istio") come from istio/istio
// commit 86c9f01fd735 (2026-08-22), which the Go module proxy does not serve (nor any tagged
// release). The pin below is a pseudo-version it does serve, eed52ebb66ad (2026-08-27):
// every Istio package the oracle links (tools/istio-iptables, tools/istio-nftables,
// tools/common, and the pkg/ packages they import) is byte for byte the same at both
// commits, and the oracle reproduces all 55 of those goldens. golang.org/x/net,
// golang.org/x/sys and grpc are raised to 86c9f01's versions, so every module linked is the
// one that commit selects.

go 1.26.0

require (
	github.com/spf13/cobra v1.10.2
	github.com/spf13/pflag v1.0.10
	istio.io/istio v0.0.0-20260827124520-eed52ebb66ad
	sigs.k8s.io/knftables v0.0.21
)

require (
	github.com/containernetworking/plugins v1.9.1 // indirect
	github.com/go-logr/logr v1.4.3 // indirect
	github.com/inconshreveable/mousetrap v1.1.0 // indirect
	github.com/miekg/dns v1.1.72 // indirect
	github.com/vishvananda/netlink v1.3.1 // indirect
	github.com/vishvananda/netns v0.0.5 // indirect
	go.uber.org/multierr v1.11.0 // indirect
	go.uber.org/zap v1.28.0 // indirect
	golang.org/x/mod v0.37.0 // indirect
	golang.org/x/net v0.57.0 // indirect
	golang.org/x/sync v0.22.0 // indirect
	golang.org/x/sys v0.47.0 // indirect
	golang.org/x/tools v0.47.0 // indirect
	google.golang.org/grpc v1.82.1 // indirect
	gopkg.in/natefinch/lumberjack.v2 v2.2.1 // indirect
	k8s.io/apimachinery v0.36.1 // indirect
	k8s.io/klog/v2 v2.140.0 // indirect
)
