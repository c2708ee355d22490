// istio-oracle: Istio's own traffic-capture code, driven the way Istio's golden tests drive
// it (no root, no kernel), so meshinit's tests can ask "what would Istio program here?".
//
//	istio-oracle rules < requests.jsonl > answers.jsonl
//
// One JSON request per line in, one JSON answer per line out, in order; a batch of
// thousands costs one process. A request is either
//
//	{"args": ["-b", "*", ...], "env": {"ISTIO_OUTBOUND_OWNER_GROUPS": "java"},
//	 "ipv6": true, "dns_servers": ["10.96.0.10"]}
//
// which goes through Istio's own istio-iptables flag and environment binding
// (tools/istio-iptables/pkg/cmd), then FillConfigFromEnvironment and Validate, with the
// machine's answers (is the pod's address IPv6? which nameservers are in resolv.conf?)
// given instead of asked; or
//
//	{"config": {"INBOUND_PORTS_INCLUDE": "*", ...}}
//
// which sets Istio's Config fields (by their JSON names) on top of the base configuration of
// Istio's golden tests, exactly as those tests do, skipping flags and environment.
//
// The answer holds the iptables-restore input per family and the command log Istio's golden
// test compares ("executed"), and the nftables transaction of Istio's native backend as
// Istio's golden test dumps it; or the error Istio would exit with, per stage. Both are
// planned only when Istio's ProgramIptables/ProgramNftables would plan them (not with
// --skip-rule-apply). "run" is how the options that shape the run rather than the rules
// resolved (probe port and timeout, skip, cleanup, ...).
//
// With "routes": true (the oracle must run as root), the routing Istio's
// tproxy.ConfigureRoutes sets up after a successful run, which its dry run skips, is really
// set up, in a network namespace of the oracle's own, and read back from the kernel as
// `ip` commands ("routes"); the namespace is emptied again after each request.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"sigs.k8s.io/knftables"

	"istio.io/istio/pkg/log"
	netutil "istio.io/istio/pkg/util/net"
	"istio.io/istio/tools/common/config"
	"istio.io/istio/tools/common/tproxy"
	iptcapture "istio.io/istio/tools/istio-iptables/pkg/capture"
	iptcmd "istio.io/istio/tools/istio-iptables/pkg/cmd"
	"istio.io/istio/tools/istio-iptables/pkg/constants"
	dep "istio.io/istio/tools/istio-iptables/pkg/dependencies"
	nftbuilder "istio.io/istio/tools/istio-nftables/pkg/builder"
	nftcapture "istio.io/istio/tools/istio-nftables/pkg/capture"
)

type request struct {
	Args       []string          `json:"args"`
	Env        map[string]string `json:"env"`
	IPv6       bool              `json:"ipv6"`
	DNSServers []string          `json:"dns_servers"`
	// Config, when present, replaces args/env: Istio's Config fields over the golden base.
	Config json.RawMessage `json:"config"`
	// Routes asks for the routing Istio sets up (root only).
	Routes bool `json:"routes"`
}

// runAnswer: Istio's resolved settings that shape the run, not the rules.
type runAnswer struct {
	DryRun              bool   `json:"dry_run"`
	SkipRuleApply       bool   `json:"skip_rule_apply"`
	CleanupOnly         bool   `json:"cleanup_only"`
	RunValidation       bool   `json:"run_validation"`
	ProbePort           uint16 `json:"probe_port"`
	ProbeTimeoutNanos   int64  `json:"probe_timeout_ns"`
	NetworkNamespace    string `json:"network_namespace"`
	CNIMode             bool   `json:"cni_mode"`
	Reconcile           bool   `json:"reconcile"`
	ForceApply          bool   `json:"force_apply"`
	NativeNftables      bool   `json:"native_nftables"`
	ForceIptablesBinary string `json:"force_iptables_binary"`
	DualStack           bool   `json:"dual_stack"`
}

type iptablesAnswer struct {
	IPv4     string `json:"ipv4"`
	IPv6     string `json:"ipv6"`
	Executed string `json:"executed"`
}

type answer struct {
	// Error is set when Istio would exit before planning any rule (flags, config, Validate).
	Error         string          `json:"error,omitempty"`
	Iptables      *iptablesAnswer `json:"iptables,omitempty"`
	IptablesError string          `json:"iptables_error,omitempty"`
	Nftables      *string         `json:"nftables,omitempty"`
	NftablesError string          `json:"nftables_error,omitempty"`
	Run           *runAnswer      `json:"run,omitempty"`
	Routes        *string         `json:"routes,omitempty"`
	// RoutesError: Istio's run fails setting its routing up (after planning the rules).
	RoutesError string `json:"routes_error,omitempty"`
	// RoutesUnavailable: the oracle could not ask (no namespace of its own without root).
	RoutesUnavailable string `json:"routes_unavailable,omitempty"`
}

func main() {
	if len(os.Args) != 2 || os.Args[1] != "rules" {
		fmt.Fprintln(os.Stderr, "usage: istio-oracle rules < requests.jsonl")
		os.Exit(2)
	}
	// Istio logs the whole configuration at info level on every run, to stdout by default;
	// stdout carries the answers, so only errors are logged, to stderr.
	opts := log.DefaultOptions()
	opts.OutputPaths = []string{"stderr"}
	opts.SetDefaultOutputLevel(log.DefaultScopeName, log.NoneLevel)
	if err := log.Configure(opts); err != nil {
		fmt.Fprintln(os.Stderr, "istio-oracle: configuring Istio's log:", err)
		os.Exit(1)
	}
	if err := serve(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "istio-oracle:", err)
		os.Exit(1)
	}
}

func serve(in io.Reader, out io.Writer) error {
	scanner := bufio.NewScanner(in)
	// A request with thousands of CIDRs is one long line.
	scanner.Buffer(make([]byte, 1<<20), 64<<20)
	writer := bufio.NewWriter(out)
	encoder := json.NewEncoder(writer)
	encoder.SetEscapeHTML(false)
	for line := 1; scanner.Scan(); line++ {
		var req request
		if err := json.Unmarshal(scanner.Bytes(), &req); err != nil {
			return fmt.Errorf("request on line %d: %w", line, err)
		}
		if err := encoder.Encode(handle(req)); err != nil {
			return err
		}
	}
	if err := scanner.Err(); err != nil {
		return err
	}
	return writer.Flush()
}

func handle(req request) answer {
	var cfg *config.Config
	var err error
	if req.Config != nil {
		cfg, err = goldenConfig(req.Config)
	} else {
		cfg, err = cliConfig(req)
	}
	if err != nil {
		return answer{Error: err.Error()}
	}
	ans := answer{Run: &runAnswer{
		DryRun:              cfg.DryRun,
		SkipRuleApply:       cfg.SkipRuleApply,
		CleanupOnly:         cfg.CleanupOnly,
		RunValidation:       cfg.RunValidation,
		ProbePort:           cfg.IptablesProbePort,
		ProbeTimeoutNanos:   int64(cfg.ProbeTimeout),
		NetworkNamespace:    cfg.NetworkNamespace,
		CNIMode:             cfg.HostFilesystemPodNetwork,
		Reconcile:           cfg.Reconcile,
		ForceApply:          cfg.ForceApply,
		NativeNftables:      cfg.NativeNftables,
		ForceIptablesBinary: cfg.ForceIptablesBinary,
		DualStack:           cfg.DualStack,
	}}
	// Istio's ProgramIptables and ProgramNftables plan nothing with --skip-rule-apply.
	if cfg.SkipRuleApply {
		empty := ""
		ans.Iptables = &iptablesAnswer{}
		ans.Nftables = &empty
		return ans
	}
	if ipt, err := programIptables(cfg); err != nil {
		ans.IptablesError = err.Error()
	} else {
		ans.Iptables = ipt
	}
	// Each backend gets its own copy: neither may see what the other's run changed.
	nft, err := programNftables(cfg)
	if err != nil {
		ans.NftablesError = err.Error()
	}
	if nft != "" || err == nil {
		ans.Nftables = &nft
	}
	// Both backends then call tproxy.ConfigureRoutes with the same settings.
	if req.Routes && ans.Iptables != nil {
		routes, unavailable, err := configuredRoutes(*cfg)
		switch {
		case unavailable != nil:
			ans.RoutesUnavailable = unavailable.Error()
		case err != nil:
			ans.RoutesError = err.Error()
		default:
			ans.Routes = &routes
		}
	}
	return ans
}

// routesRequest: one configuration whose routing the namespace thread sets up and reads.
type routesRequest struct {
	cfg   config.Config
	reply chan routesReply
}

type routesReply struct {
	text string
	err  error
}

var routesQueue chan routesRequest

// configuredRoutes runs Istio's tproxy.ConfigureRoutes for cfg (not as a dry run) in the
// oracle's own network namespace, and returns what the kernel then holds, as `ip` commands;
// or the error Istio's run would fail with; or why the oracle cannot ask.
func configuredRoutes(cfg config.Config) (string, error, error) {
	if routesQueue == nil {
		routesQueue = make(chan routesRequest)
		ready := make(chan error)
		go routesThread(ready)
		if err := <-ready; err != nil {
			routesQueue = nil
			return "", err, nil
		}
	}
	reply := make(chan routesReply)
	routesQueue <- routesRequest{cfg: cfg, reply: reply}
	r := <-reply
	return r.text, nil, r.err
}

// routesThread owns an OS thread moved into a fresh network namespace (never unlocked, so
// the thread, and the namespace with it, ends when the process does).
func routesThread(ready chan<- error) {
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		ready <- fmt.Errorf("a network namespace for Istio's routing (needs root): %w", err)
		return
	}
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		// A pod's loopback is up; a local route on a down device is refused.
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		ready <- fmt.Errorf("bringing up lo in the oracle's namespace: %w", err)
		return
	}
	ready <- nil
	for req := range routesQueue {
		cfg := req.cfg
		cfg.DryRun = false
		var text string
		err := tproxy.ConfigureRoutes(&cfg)
		if err == nil {
			text, err = readRouting(lo)
		}
		if cleanErr := clearRouting(lo); err == nil {
			err = cleanErr
		}
		req.reply <- routesReply{text: text, err: err}
	}
}

// ownRule: a rule not among the kernel's three defaults (local, main, default).
func ownRule(r netlink.Rule) bool {
	return !(r.Mark == 0 && (r.Table == unix.RT_TABLE_LOCAL || r.Table == unix.RT_TABLE_MAIN ||
		r.Table == unix.RT_TABLE_DEFAULT))
}

// ownAddr: an address on lo the kernel did not put there.
func ownAddr(a netlink.Addr) bool {
	return !a.IP.IsLoopback()
}

// ownRoutes: every route outside the kernel's local and main tables.
func ownRoutes(family int) ([]netlink.Route, error) {
	routes, err := netlink.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_UNSPEC},
		netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, err
	}
	var own []netlink.Route
	for _, r := range routes {
		if r.Table != unix.RT_TABLE_LOCAL && r.Table != unix.RT_TABLE_MAIN {
			own = append(own, r)
		}
	}
	return own, nil
}

var families = []struct {
	family int
	flag   string
}{{unix.AF_INET, "-4"}, {unix.AF_INET6, "-6"}}

// readRouting: addresses on lo, rules and routes beyond the kernel's, one `ip` command each
// (sorted), in the form meshinit's print writes them.
func readRouting(lo netlink.Link) (string, error) {
	var lines []string
	for _, f := range families {
		addrs, err := netlink.AddrList(lo, f.family)
		if err != nil {
			return "", err
		}
		for _, a := range addrs {
			if ownAddr(a) {
				lines = append(lines, fmt.Sprintf("ip %s addr add %s dev lo", f.flag, a.IPNet))
			}
		}
		rules, err := netlink.RuleList(f.family)
		if err != nil {
			return "", err
		}
		for _, r := range rules {
			if ownRule(r) {
				lines = append(lines, fmt.Sprintf("ip %s rule add fwmark %d lookup %d", f.flag, r.Mark, r.Table))
			}
		}
		routes, err := ownRoutes(f.family)
		if err != nil {
			return "", err
		}
		for _, r := range routes {
			kind := "unicast"
			if r.Type == unix.RTN_LOCAL {
				kind = "local"
			}
			dst := "default"
			if r.Dst != nil {
				if ones, _ := r.Dst.Mask.Size(); ones != 0 {
					dst = r.Dst.String()
				}
			}
			dev := "?"
			if r.LinkIndex == lo.Attrs().Index {
				dev = "lo"
			}
			lines = append(lines, fmt.Sprintf("ip %s route add %s %s dev %s table %d", f.flag, kind, dst, dev, r.Table))
		}
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n"), nil
}

// clearRouting removes what readRouting reports, so the next request starts from a fresh
// namespace's state.
func clearRouting(lo netlink.Link) error {
	for _, f := range families {
		addrs, err := netlink.AddrList(lo, f.family)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if ownAddr(a) {
				if err := netlink.AddrDel(lo, &a); err != nil {
					return err
				}
			}
		}
		rules, err := netlink.RuleList(f.family)
		if err != nil {
			return err
		}
		for _, r := range rules {
			if ownRule(r) {
				if err := netlink.RuleDel(&r); err != nil {
					return err
				}
			}
		}
		routes, err := ownRoutes(f.family)
		if err != nil {
			return err
		}
		for _, r := range routes {
			if err := netlink.RouteDel(&r); err != nil {
				return err
			}
		}
	}
	return nil
}

// goldenConfig is constructTestConfig() of Istio's golden tests (both backends use the same
// base) with the request's fields set on top.
func goldenConfig(fields json.RawMessage) (*config.Config, error) {
	cfg := &config.Config{
		ProxyPort:               "15001",
		InboundCapturePort:      "15006",
		InboundTunnelPort:       "15008",
		ProxyUID:                constants.DefaultProxyUID,
		ProxyGID:                constants.DefaultProxyUID,
		InboundTProxyMark:       "1337",
		InboundTProxyRouteTable: "133",
		OwnerGroupsInclude:      constants.OwnerGroupsInclude.DefaultValue,
		HostIPv4LoopbackCidr:    constants.HostIPv4LoopbackCidr.DefaultValue,
	}
	decoder := json.NewDecoder(strings.NewReader(string(fields)))
	decoder.DisallowUnknownFields()
	if err := decoder.Decode(cfg); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return cfg, nil
}

// cliConfig is what `pilot-agent istio-iptables ARGS` with ENV ends up with before it
// programs anything: Istio's command, flags bound by Istio's code (which reads the
// environment while binding), then FillConfigFromEnvironment and Validate.
func cliConfig(req request) (*config.Config, error) {
	os.Clearenv()
	for k, v := range req.Env {
		if err := os.Setenv(k, v); err != nil {
			return nil, err
		}
	}
	defer os.Clearenv()

	// pilot-agent, which runs istio-iptables, adds its logging flags (--log_output_level,
	// which Istio's injection template passes); they parse, and shape no rule.
	logOpts := log.DefaultOptions()
	cmd := iptcmd.GetCommand(logOpts)
	logOpts.AttachCobraFlags(cmd)
	if err := cmd.ParseFlags(req.Args); err != nil {
		return nil, fmt.Errorf("flags: %w", err)
	}
	if rest := cmd.Flags().Args(); len(rest) > 0 {
		return nil, fmt.Errorf("flags: unexpected arguments %q", rest)
	}
	cfg, err := configFromFlags(cmd)
	if err != nil {
		return nil, err
	}

	// The pod's addresses: the first non-loopback one decides IPv6, or with dual-stack any
	// IPv6 one. One address of the requested family gives the same answer either way.
	addr := &net.IPNet{IP: net.ParseIP("10.244.0.7"), Mask: net.CIDRMask(24, 32)}
	if req.IPv6 {
		addr = &net.IPNet{IP: net.ParseIP("fd00:10:244::7"), Mask: net.CIDRMask(64, 128)}
	}
	config.LocalIPAddrs = func() ([]net.Addr, error) { return []net.Addr{addr}, nil }

	// FillConfigFromEnvironment reads /etc/resolv.conf when DNS capture needs servers; the
	// request gives them instead, split the way Istio splits resolv.conf's.
	redirectDNS := cfg.RedirectDNS
	cfg.RedirectDNS = false
	err = cfg.FillConfigFromEnvironment()
	cfg.RedirectDNS = redirectDNS
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if cfg.RedirectDNS && !cfg.CaptureAllDNS {
		cfg.DNSServersV4, cfg.DNSServersV6 = netutil.IPsSplitV4V6(req.DNSServers)
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("validate: %w", err)
	}
	return cfg, nil
}

// configFromFlags reads back every flag Istio's command bound, into a Config. Istio binds
// its flags to a Config it keeps to itself; the flag values are that Config's fields, so
// reading them back field for field (defaults are DefaultConfig()'s, as Istio binds them)
// gives the same Config.
func configFromFlags(cmd *cobra.Command) (*config.Config, error) {
	cfg := config.DefaultConfig()
	fs := cmd.Flags()
	str := map[string]*string{
		constants.EnvoyPort:                 &cfg.ProxyPort,
		constants.InboundCapturePort:        &cfg.InboundCapturePort,
		constants.InboundTunnelPort:         &cfg.InboundTunnelPort,
		constants.ProxyUID:                  &cfg.ProxyUID,
		constants.ProxyGID:                  &cfg.ProxyGID,
		constants.InboundInterceptionMode:   &cfg.InboundInterceptionMode,
		constants.InboundPorts:              &cfg.InboundPortsInclude,
		constants.LocalExcludePorts:         &cfg.InboundPortsExclude,
		constants.ExcludeInterfaces:         &cfg.ExcludeInterfaces,
		constants.ServiceCidr:               &cfg.OutboundIPRangesInclude,
		constants.ServiceExcludeCidr:        &cfg.OutboundIPRangesExclude,
		constants.OutboundPorts:             &cfg.OutboundPortsInclude,
		constants.LocalOutboundPortsExclude: &cfg.OutboundPortsExclude,
		constants.RerouteVirtualInterfaces:  &cfg.RerouteVirtualInterfaces,
		constants.InboundTProxyMark:         &cfg.InboundTProxyMark,
		constants.InboundTProxyRouteTable:   &cfg.InboundTProxyRouteTable,
		constants.NetworkNamespace:          &cfg.NetworkNamespace,
		constants.ForceIptablesBinary:       &cfg.ForceIptablesBinary,
	}
	boolean := map[string]*bool{
		constants.DryRun:         &cfg.DryRun,
		constants.SkipRuleApply:  &cfg.SkipRuleApply,
		constants.RunValidation:  &cfg.RunValidation,
		constants.RedirectDNS:    &cfg.RedirectDNS,
		constants.DropInvalid:    &cfg.DropInvalid,
		constants.DualStack:      &cfg.DualStack,
		constants.CaptureAllDNS:  &cfg.CaptureAllDNS,
		constants.CNIMode:        &cfg.HostFilesystemPodNetwork,
		constants.Reconcile:      &cfg.Reconcile,
		constants.CleanupOnly:    &cfg.CleanupOnly,
		constants.ForceApply:     &cfg.ForceApply,
		constants.NativeNftables: &cfg.NativeNftables,
	}
	for name, field := range str {
		f := fs.Lookup(name)
		if f == nil {
			return nil, fmt.Errorf("Istio's command has no flag --%s", name)
		}
		*field = f.Value.String()
	}
	for name, field := range boolean {
		f := fs.Lookup(name)
		if f == nil {
			return nil, fmt.Errorf("Istio's command has no flag --%s", name)
		}
		v, err := strconv.ParseBool(f.Value.String())
		if err != nil {
			return nil, fmt.Errorf("flag --%s: %w", name, err)
		}
		*field = v
	}
	port, err := strconv.ParseUint(fs.Lookup(constants.IptablesProbePort).Value.String(), 10, 16)
	if err != nil {
		return nil, fmt.Errorf("flag --%s: %w", constants.IptablesProbePort, err)
	}
	cfg.IptablesProbePort = uint16(port)
	timeout, err := time.ParseDuration(fs.Lookup(constants.ProbeTimeout).Value.String())
	if err != nil {
		return nil, fmt.Errorf("flag --%s: %w", constants.ProbeTimeout, err)
	}
	cfg.ProbeTimeout = timeout
	// Every flag Istio binds must be read back above (or be one of those that do not shape
	// the rules), so a flag added in a newer Istio cannot be silently dropped.
	var unknown []string
	fs.VisitAll(func(f *pflag.Flag) {
		if _, ok := str[f.Name]; ok {
			return
		}
		if _, ok := boolean[f.Name]; ok {
			return
		}
		if f.Name == constants.IptablesProbePort || f.Name == constants.ProbeTimeout ||
			strings.HasPrefix(f.Name, "log_") {
			return
		}
		unknown = append(unknown, f.Name)
	})
	if len(unknown) > 0 {
		return nil, fmt.Errorf("Istio's command has flags the oracle does not read: %v", unknown)
	}
	return cfg, nil
}

// recorder is Istio's dry-run dependencies stub (what its golden test records), also
// keeping each restore input by the binary it was meant for.
type recorder struct {
	*dep.DependenciesStub
	restore map[string]string
}

func (r *recorder) Run(logger *log.Scope, quiet bool, cmd constants.IptablesCmd, ver *dep.IptablesVersion,
	stdin io.ReadSeeker, args ...string,
) (*bytes.Buffer, error) {
	if stdin != nil && cmd == constants.IPTablesRestore {
		data, err := io.ReadAll(stdin)
		if err != nil {
			return nil, err
		}
		r.restore[ver.DetectedRestoreBinary] += string(data)
		if _, err := stdin.Seek(0, io.SeekStart); err != nil {
			return nil, err
		}
	}
	return r.DependenciesStub.Run(logger, quiet, cmd, ver, stdin, args...)
}

func programIptables(base *config.Config) (*iptablesAnswer, error) {
	cfg := *base
	rec := &recorder{DependenciesStub: &dep.DependenciesStub{}, restore: map[string]string{}}
	configurator, err := iptcapture.NewIptablesConfigurator(&cfg, rec)
	if err != nil {
		return nil, err
	}
	if err := configurator.Run(); err != nil {
		return nil, err
	}
	return &iptablesAnswer{
		IPv4:     rec.restore["iptables-restore"],
		IPv6:     rec.restore["ip6tables-restore"],
		Executed: strings.Join(rec.ExecutedAll, "\n"),
	}, nil
}

// programNftables is Istio's TestNftables: knftables' fake as the backend, the transaction
// dumped as text. A transaction the fake refuses (as nft would) is returned with the error.
func programNftables(base *config.Config) (string, error) {
	cfg := *base
	mock := nftbuilder.NewMockNftables("", "")
	provider := func(_ knftables.Family, _ string) (nftbuilder.NftablesAPI, error) { return mock, nil }
	configurator, err := nftcapture.NewNftablesConfigurator(&cfg, provider)
	if err != nil {
		return "", err
	}
	tx, err := configurator.Run()
	dump := ""
	if tx != nil {
		dump = mock.Dump(tx)
	}
	return dump, err
}
