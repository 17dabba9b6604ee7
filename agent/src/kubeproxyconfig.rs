//! `ferry agent --config FILE`: a kube-proxy configuration file
//! (`KubeProxyConfiguration`, `kubeproxy.config.k8s.io/v1alpha1`) reused as it
//! is. The fields that mean the same thing here become the matching flags'
//! values (flags given on the command line win); every other field is
//! reported by name, with why it does not apply.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_yaml::{Mapping, Value};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// What the file sets, as the flags would.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// hostnameOverride → --node-name.
    pub node_name: Option<String>,
    /// clientConnection.kubeconfig → --kubeconfig.
    pub kubeconfig: Option<PathBuf>,
    /// healthzBindAddress → --healthz-bind-address.
    pub healthz_bind_address: Option<String>,
    /// metricsBindAddress → --metrics-bind-address.
    pub metrics_bind_address: Option<String>,
    /// nodePortAddresses → --nodeport-addresses.
    pub nodeport_addresses: Option<Vec<ipnet::IpNet>>,
    /// conntrack.maxPerCore × CPUs (at least conntrack.min) connections, two
    /// map entries each → --ct-map-size.
    pub ct_map_size: Option<u32>,
    /// conntrack.tcpEstablishedTimeout → --ct-timeout-tcp.
    pub ct_timeout_tcp: Option<Duration>,
    /// conntrack.udpTimeout → --ct-timeout-udp.
    pub ct_timeout_udp: Option<Duration>,
    /// conntrack.udpStreamTimeout → --ct-timeout-udp-stream.
    pub ct_timeout_udp_stream: Option<Duration>,
    /// syncPeriod (or iptables/nftables/ipvs.syncPeriod) → --sync-period-seconds.
    pub sync_period_seconds: Option<u64>,
    /// minSyncPeriod (or iptables/... .minSyncPeriod) → --sync-debounce-ms.
    pub sync_debounce_ms: Option<u64>,
}

/// The file's settings and the fields that were not used, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub settings: Settings,
    /// `field: why` for every field that is unknown or has no equivalent.
    pub ignored: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not YAML: {source}")]
    Yaml { path: PathBuf, source: serde_yaml::Error },
    #[error("{path}: {field}: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// Reads `path`; `cpus` scales conntrack.maxPerCore.
pub fn load(path: &Path, cpus: u32) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, cpus).map_err(|e| match e {
        Parse::Yaml(source) => ConfigError::Yaml {
            path: path.to_path_buf(),
            source,
        },
        Parse::Field(field, message) => ConfigError::Field {
            path: path.to_path_buf(),
            field,
            message,
        },
    })
}

/// A parse error before the file name is known.
#[derive(Debug)]
pub enum Parse {
    Yaml(serde_yaml::Error),
    /// (field path, message).
    Field(String, String),
}

fn bad(field: &str, message: impl Into<String>) -> Parse {
    Parse::Field(field.to_string(), message.into())
}

/// Fields kube-proxy has that do nothing here, and why.
const NO_EQUIVALENT: &[(&str, &str)] = &[
    (
        "bindAddress",
        "Ferry serves Services in the kernel, it binds no proxy address",
    ),
    ("bindAddressHardFail", "Ferry binds no proxy address"),
    (
        "clusterCIDR",
        "Ferry tells Pod traffic by interface (Pod veths), not by CIDR",
    ),
    ("detectLocalMode", "Ferry tells Pod traffic by interface (Pod veths)"),
    ("detectLocal", "Ferry tells Pod traffic by interface (Pod veths)"),
    ("mode", "Ferry is the proxy (eBPF); there is no mode to choose"),
    ("portRange", "deprecated in kube-proxy, and unused"),
    ("oomScoreAdj", "set the Pod's resources instead"),
    ("enableProfiling", "not implemented"),
    ("showHiddenMetricsForVersion", "not implemented"),
    ("udpIdleTimeout", "deprecated in kube-proxy, and unused"),
    ("winkernel", "Windows only"),
    ("windowsRunAsService", "Windows only"),
    ("logging", "use --log-format and RUST_LOG"),
    (
        "configSyncPeriod",
        "Ferry watches the objects; there is no config resync",
    ),
    (
        "masqueradeAll",
        "Ferry SNATs only what needs it (hairpin, remote backends of external traffic)",
    ),
];

/// Reads a KubeProxyConfiguration document; `cpus` scales maxPerCore.
pub fn parse(text: &str, cpus: u32) -> Result<Loaded, Parse> {
    let doc: Value = serde_yaml::from_str(text).map_err(Parse::Yaml)?;
    let map = doc
        .as_mapping()
        .ok_or_else(|| bad("(document)", "expected a mapping"))?;
    let mut out = Loaded::default();
    check_type(map)?;
    for (key, value) in map {
        let Some(key) = key.as_str() else {
            out.ignored.push(format!("{key:?}: not a field name"));
            continue;
        };
        field(key, value, cpus, &mut out)?;
    }
    Ok(out)
}

fn check_type(map: &Mapping) -> Result<(), Parse> {
    let get = |k: &str| map.get(k).and_then(Value::as_str);
    if get("apiVersion") != Some(API_VERSION) {
        return Err(bad(
            "apiVersion",
            format!("want {API_VERSION}, got {:?}", get("apiVersion")),
        ));
    }
    if get("kind") != Some(KIND) {
        return Err(bad("kind", format!("want {KIND}, got {:?}", get("kind"))));
    }
    Ok(())
}

/// One top-level field.
fn field(key: &str, value: &Value, cpus: u32, out: &mut Loaded) -> Result<(), Parse> {
    let s = &mut out.settings;
    match key {
        "apiVersion" | "kind" => {}
        "hostnameOverride" => s.node_name = non_empty(string(key, value)?),
        "healthzBindAddress" => s.healthz_bind_address = Some(bind_address(key, value)?),
        "metricsBindAddress" => s.metrics_bind_address = Some(bind_address(key, value)?),
        "nodePortAddresses" => s.nodeport_addresses = node_port_addresses(key, value, &mut out.ignored)?,
        "clientConnection" => client_connection(value, out)?,
        "conntrack" => conntrack(value, cpus, out)?,
        "syncPeriod" => s.sync_period_seconds = Some(seconds(key, value)?),
        "minSyncPeriod" => s.sync_debounce_ms = Some(millis(key, value)?),
        "iptables" | "nftables" | "ipvs" => proxier(key, value, out)?,
        "featureGates" => feature_gates(value, &mut out.ignored)?,
        _ => match NO_EQUIVALENT.iter().find(|(k, _)| *k == key) {
            Some((_, why)) => out.ignored.push(format!("{key}: not used: {why}")),
            None => out.ignored.push(format!("{key}: unknown field")),
        },
    }
    Ok(())
}

fn string(field: &str, v: &Value) -> Result<String, Parse> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| bad(field, "expected a string"))
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// `IP:PORT` (an empty string disables, as for the flag).
fn bind_address(field: &str, v: &Value) -> Result<String, Parse> {
    let s = string(field, v)?;
    if !s.is_empty() {
        s.parse::<SocketAddr>()
            .map_err(|e| bad(field, format!("{s:?}: want IP:PORT: {e}")))?;
    }
    Ok(s)
}

/// A list of CIDRs of either family (as `--nodeport-addresses`); kube-proxy's
/// `primary` is reported and skipped (the default here).
fn node_port_addresses(field: &str, v: &Value, ignored: &mut Vec<String>) -> Result<Option<Vec<ipnet::IpNet>>, Parse> {
    let items = v.as_sequence().ok_or_else(|| bad(field, "expected a list of CIDRs"))?;
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let s = string(&at, item)?;
        match s.parse::<ipnet::IpNet>() {
            Ok(n) => out.push(n),
            Err(_) if s == "primary" => ignored.push(format!(
                "{at}: primary: the default already (the addresses of --devices)"
            )),
            Err(e) => return Err(bad(&at, format!("{s:?}: {e}"))),
        }
    }
    Ok((!out.is_empty()).then_some(out))
}

fn mapping<'a>(field: &str, v: &'a Value) -> Result<&'a Mapping, Parse> {
    v.as_mapping().ok_or_else(|| bad(field, "expected a mapping"))
}

/// Walks a nested mapping: `f(key, value)` for each field, unknown ones named
/// as `prefix.key`.
fn each(
    prefix: &str,
    v: &Value,
    out: &mut Loaded,
    mut f: impl FnMut(&str, &str, &Value, &mut Loaded) -> Result<bool, Parse>,
) -> Result<(), Parse> {
    for (k, value) in mapping(prefix, v)? {
        let key = k.as_str().unwrap_or_default();
        let path = format!("{prefix}.{key}");
        if !f(key, &path, value, out)? {
            out.ignored.push(format!("{path}: not used by Ferry"));
        }
    }
    Ok(())
}

fn client_connection(v: &Value, out: &mut Loaded) -> Result<(), Parse> {
    each("clientConnection", v, out, |key, path, value, out| {
        Ok(match key {
            "kubeconfig" => {
                out.settings.kubeconfig = non_empty(string(path, value)?).map(PathBuf::from);
                true
            }
            _ => false,
        })
    })
}

fn conntrack(v: &Value, cpus: u32, out: &mut Loaded) -> Result<(), Parse> {
    let (mut per_core, mut min) = (None, None);
    each("conntrack", v, out, |key, path, value, out| {
        let lifetime = || Ok::<_, Parse>(Some(Duration::from_secs(seconds(path, value)?)));
        let s = &mut out.settings;
        let int = || {
            value
                .as_u64()
                .ok_or_else(|| bad(path, "expected a non-negative integer"))
        };
        Ok(match key {
            "maxPerCore" => {
                per_core = Some(int()?);
                true
            }
            "min" => {
                min = Some(int()?);
                true
            }
            "tcpEstablishedTimeout" => {
                s.ct_timeout_tcp = lifetime()?;
                true
            }
            "udpTimeout" => {
                s.ct_timeout_udp = lifetime()?;
                true
            }
            "udpStreamTimeout" => {
                s.ct_timeout_udp_stream = lifetime()?;
                true
            }
            _ => false,
        })
    })?;
    // kube-proxy: maxPerCore 0 leaves the kernel's limit alone.
    let Some(per_core) = per_core.filter(|n| *n > 0) else {
        return Ok(());
    };
    let connections = (per_core * u64::from(cpus)).max(min.unwrap_or(0));
    let entries = u32::try_from(connections * 2)
        .map_err(|_| bad("conntrack.maxPerCore", format!("{connections} connections is too many")))?;
    out.settings.ct_map_size = Some(entries);
    Ok(())
}

/// iptables/nftables/ipvs: only their sync periods mean something here (the
/// top-level ones, where set, win: they are newer).
fn proxier(key: &str, v: &Value, out: &mut Loaded) -> Result<(), Parse> {
    each(key, v, out, |k, path, value, out| {
        let s = &mut out.settings;
        Ok(match k {
            "syncPeriod" => {
                s.sync_period_seconds.get_or_insert(seconds(path, value)?);
                true
            }
            "minSyncPeriod" => {
                s.sync_debounce_ms.get_or_insert(millis(path, value)?);
                true
            }
            _ => false,
        })
    })
}

fn feature_gates(v: &Value, ignored: &mut Vec<String>) -> Result<(), Parse> {
    for (k, value) in mapping("featureGates", v)? {
        let gate = k.as_str().unwrap_or_default();
        let on = value
            .as_bool()
            .ok_or_else(|| bad(&format!("featureGates.{gate}"), "expected true or false"))?;
        ignored.push(format!(
            "featureGates.{gate}={on}: Ferry has no feature gates; its behaviour is fixed"
        ));
    }
    Ok(())
}

fn seconds(field: &str, v: &Value) -> Result<u64, Parse> {
    let d = duration(field, v)?;
    if d < Duration::from_secs(1) {
        return Err(bad(field, "must be at least 1s"));
    }
    Ok(d.as_secs())
}

fn millis(field: &str, v: &Value) -> Result<u64, Parse> {
    Ok(duration(field, v)?.as_millis() as u64)
}

fn duration(field: &str, v: &Value) -> Result<Duration, Parse> {
    let s = string(field, v)?;
    go_duration(&s).ok_or_else(|| bad(field, format!("{s:?}: want a duration like 30s, 1m0s or 500ms")))
}

/// A Go duration string: `0`, or numbers with units h, m, s, ms, us/µs, ns.
pub fn go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    (!s.is_empty()).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
hostnameOverride: node-7
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
healthzBindAddress: 0.0.0.0:10266
metricsBindAddress: 127.0.0.1:10267
nodePortAddresses: ["192.168.0.0/16", "fd00::/64", "primary"]
clusterCIDR: 10.244.0.0/16
mode: iptables
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpEstablishedTimeout: 24h0m0s
iptables:
  syncPeriod: 45s
  minSyncPeriod: 1s
  masqueradeAll: false
featureGates:
  SomeGate: true
fancyNewThing: 3
"#;

    #[test]
    fn the_fields_that_mean_the_same_become_settings_and_the_rest_is_named() {
        let l = parse(FILE, 4).unwrap();
        assert_eq!(
            l.settings,
            Settings {
                node_name: Some("node-7".into()),
                kubeconfig: Some("/var/lib/kube-proxy/kubeconfig.conf".into()),
                healthz_bind_address: Some("0.0.0.0:10266".into()),
                metrics_bind_address: Some("127.0.0.1:10267".into()),
                // Both families (IPv6 NodePorts are named, not served yet).
                nodeport_addresses: Some(vec!["192.168.0.0/16".parse().unwrap(), "fd00::/64".parse().unwrap()]),
                // max(32768 × 4, 131072) connections, two entries each.
                ct_map_size: Some(262144),
                ct_timeout_tcp: Some(Duration::from_secs(86_400)),
                ct_timeout_udp: None,
                ct_timeout_udp_stream: None,
                sync_period_seconds: Some(45),
                sync_debounce_ms: Some(1000),
            }
        );
        for name in [
            "clientConnection.qps",
            "nodePortAddresses[2]: primary",
            "clusterCIDR",
            "mode",
            "iptables.masqueradeAll",
            "featureGates.SomeGate=true",
            "fancyNewThing: unknown field",
        ] {
            assert!(
                l.ignored.iter().any(|i| i.starts_with(name)),
                "{name} is reported: {:#?}",
                l.ignored
            );
        }
        assert_eq!(l.ignored.len(), 7, "{:#?}", l.ignored);
    }

    #[test]
    fn bad_values_name_their_field() {
        let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
        for (body, field) in [
            ("healthzBindAddress: 10256\n", "healthzBindAddress"),
            ("metricsBindAddress: localhost\n", "metricsBindAddress"),
            ("nodePortAddresses: [10.0.0.0/33]\n", "nodePortAddresses[0]"),
            ("conntrack: {maxPerCore: -1}\n", "conntrack.maxPerCore"),
            ("iptables: {syncPeriod: soon}\n", "iptables.syncPeriod"),
            ("syncPeriod: 500ms\n", "syncPeriod"),
        ] {
            match parse(&format!("{head}{body}"), 2) {
                Err(Parse::Field(f, _)) => assert_eq!(f, field, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        assert!(matches!(parse("kind: KubeProxyConfiguration\n", 1), Err(Parse::Field(f, _)) if f == "apiVersion"));
        assert!(matches!(parse("[", 1), Err(Parse::Yaml(_))));
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(go_duration("1m0s"), Some(Duration::from_secs(60)));
        assert_eq!(go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        for bad in ["", "s", "10", "5d", "1s5"] {
            assert_eq!(go_duration(bad), None, "{bad}");
        }
    }
}
