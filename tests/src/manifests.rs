//! Manifest builders for tests: Pods running `ferry echo`, Services, slices.

/// A Pod running the echo server on TCP and UDP 8080, ready once TCP 8080 accepts.
/// `readiness_file`: if given, the Pod is ready only while that file does not exist.
pub fn echo_pod(name: &str, app: &str, readiness_file: Option<&str>) -> String {
    let readiness = match readiness_file {
        Some(f) => format!("exec:\n  command: [\"sh\", \"-c\", \"test ! -e {f}\"]\nfailureThreshold: 1"),
        None => "tcpSocket:\n  port: http".to_string(),
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    app: {app}\nspec:\n{}",
        indent(&echo_spec(&readiness), 2)
    )
}

/// A Deployment of `replicas` echo Pods (as [`echo_pod`], ready once TCP 8080
/// accepts) labelled `app`, without spec.nodeName: the shims spread them.
pub fn echo_deployment(name: &str, app: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: default
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app: {app}
  template:
    metadata:
      labels:
        app: {app}
    spec:
{}"#,
        indent(&echo_spec("tcpSocket:\n  port: http"), 6)
    )
}

/// The spec of an echo Pod with the readiness probe `readiness` (its handler
/// and settings), unindented.
fn echo_spec(readiness: &str) -> String {
    format!(
        r#"terminationGracePeriodSeconds: 1
containers:
  - name: echo
    command: ["ferry", "echo", "--tcp", "8080", "--udp", "8080"]
    ports:
      - name: http
        containerPort: 8080
      - name: dns
        containerPort: 8080
        protocol: UDP
    readinessProbe:
{}      periodSeconds: 1
"#,
        indent(readiness, 6)
    )
}

/// The spec of an echo Pod that, like a well-behaved server, keeps serving
/// after SIGTERM (it ignores it) until the grace period ends; unindented.
pub fn draining_echo_spec(grace: u32) -> String {
    format!(
        r#"terminationGracePeriodSeconds: {grace}
containers:
  - name: echo
    command: ["sh", "-c", "trap '' TERM; exec ferry echo --tcp 8080 --udp 8080"]
    ports:
      - {{name: http, containerPort: 8080}}
    readinessProbe:
      tcpSocket: {{port: http}}
      periodSeconds: 1
"#
    )
}

/// A Pod of [`draining_echo_spec`] labelled `app`.
pub fn draining_echo_pod(name: &str, app: &str, grace: u32) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: {app}}}\nspec:\n{}",
        indent(&draining_echo_spec(grace), 2)
    )
}

/// `text` with every non-empty line indented by `n` spaces (to nest a YAML
/// block).
pub fn indent(text: &str, n: usize) -> String {
    text.lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("{}{l}\n", " ".repeat(n))
            }
        })
        .collect()
}

/// A Pod that only sleeps: a client.
pub fn client_pod(name: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: client
      command: ["sleep", "infinity"]
"#
    )
}

/// A ClusterIP Service selecting `app` with a TCP port 80 -> http and a UDP port
/// 53 -> 8080.
pub fn echo_service(name: &str, app: &str, cluster_ip: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  clusterIP: {cluster_ip}
  selector:
    app: {app}
  ports:
    - name: http
      port: 80
      targetPort: http
    - name: dns
      port: 53
      protocol: UDP
      targetPort: 8080
"#
    )
}

/// The same Pod manifest, pinned to a node (spec.nodeName).
pub fn on_node(pod_yaml: &str, node: &str) -> String {
    pod_yaml.replacen("\nspec:\n", &format!("\nspec:\n  nodeName: {node}\n"), 1)
}

/// A Pod `name` labelled `app` that sends back every byte it gets: TCP on
/// 9000 (ready once it accepts) and UDP datagrams on 9001, up to 64 KiB
/// (socat + cat).
pub fn cat_pod(name: &str, app: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: tcp
      command: ["socat", "TCP-LISTEN:9000,fork,reuseaddr", "EXEC:cat"]
      ports: [{{name: data, containerPort: 9000}}]
      readinessProbe:
        tcpSocket: {{port: 9000}}
        periodSeconds: 1
    - name: udp
      command: ["socat", "-b", "65536", "UDP-RECVFROM:9001,fork", "EXEC:cat"]
"#
    )
}

/// A NodePort Service `np` selecting `app: echo`: TCP 8081 → 8080 on
/// nodePort 30080, UDP 5353 → 8080 on nodePort 30053.
pub const ECHO_NODEPORT_SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  selector: {app: echo}
  ports:
    - {name: http, port: 8081, targetPort: 8080, nodePort: 30080}
    - {name: dns, port: 5353, protocol: UDP, targetPort: 8080, nodePort: 30053}
"#;

/// `hostsvc`, a selectorless NodePort Service (ClusterIP 10.96.0.50; TCP
/// 443, NodePort 30443, and UDP 53) and its slice: one host-network
/// endpoint, `addr` port 8090 on node `node`.
pub fn host_network_service(node: &str, addr: std::net::Ipv4Addr) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: hostsvc, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.50
  ports:
    - {{name: tcp, port: 443, targetPort: 8090, nodePort: 30443}}
    - {{name: udp, port: 53, protocol: UDP, targetPort: 8090}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: hostsvc-1
  namespace: default
  labels: {{kubernetes.io/service-name: hostsvc}}
addressType: IPv4
endpoints:
  - addresses: ["{addr}"]
    nodeName: {node}
    conditions: {{ready: true}}
ports:
  - {{name: tcp, port: 8090, protocol: TCP}}
  - {{name: udp, port: 8090, protocol: UDP}}
"#
    )
}

/// A selector-less Service `name` at `cluster_ip` (TCP 80 -> 8080) with
/// `internalTrafficPolicy: policy` and a manual EndpointSlice of one ready
/// endpoint `endpoint` said to run on `node`.
pub fn itp_service(name: &str, cluster_ip: &str, policy: &str, endpoint: &str, node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {cluster_ip}
  internalTrafficPolicy: {policy}
  ports: [{{name: web, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
endpoints: [{{addresses: ["{endpoint}"], nodeName: {node}, conditions: {{ready: true}}}}]
ports: [{{name: web, port: 8080, protocol: TCP}}]
"#
    )
}

/// Three [`itp_service`]s over one manual endpoint `endpoint`: `local-here`
/// (10.96.0.61, Local, the endpoint on `node`), `local-remote` (10.96.0.62,
/// Local, on another node) and `cluster-remote` (10.96.0.63, Cluster, on
/// another node), as (file name, manifest).
pub fn itp_services(endpoint: std::net::Ipv4Addr, node: &str) -> [(String, String); 3] {
    let svc = |name: &str, ip4: &str, policy: &str, node: &str| {
        (
            format!("{name}.yaml"),
            itp_service(name, ip4, policy, &endpoint.to_string(), node),
        )
    };
    [
        svc("local-here", "10.96.0.61", "Local", node),
        svc("local-remote", "10.96.0.62", "Local", "some-other-node"),
        svc("cluster-remote", "10.96.0.63", "Cluster", "some-other-node"),
    ]
}

/// A Service without endpoints at 10.96.0.40 (TCP 80, UDP 53): its selector
/// matches nothing.
pub const EMPTY_SVC: &str = r#"apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.40
  selector: {app: nothing-matches}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 8080}
"#;

/// `sticky` at 10.96.0.50:80 over the Pods labelled `app: echo`, with
/// `sessionAffinity: ClientIP` for `timeout_seconds`.
pub fn sticky_service(timeout_seconds: u32) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: sticky, namespace: default}}
spec:
  clusterIP: 10.96.0.50
  selector: {{app: echo}}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout_seconds}}}}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> serde_yaml::Value {
        serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{e}:\n{text}"))
    }

    #[test]
    fn echo_pods_and_deployments_share_one_pod_spec() {
        let pod = yaml(&on_node(&echo_pod("a", "web", Some("/tmp/x")), "n2"));
        let probe = &pod["spec"]["containers"][0]["readinessProbe"];
        assert_eq!(probe["exec"]["command"][2].as_str(), Some("test ! -e /tmp/x"));
        assert_eq!(
            (probe["failureThreshold"].as_u64(), probe["periodSeconds"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(pod["spec"]["nodeName"].as_str(), Some("n2"));
        assert_eq!(pod["metadata"]["labels"]["app"].as_str(), Some("web"));
        let plain = yaml(&echo_pod("b", "web", None));
        assert_eq!(
            plain["spec"]["containers"][0]["readinessProbe"]["tcpSocket"]["port"].as_str(),
            Some("http")
        );
        let d = yaml(&echo_deployment("d", "web", 3));
        assert_eq!(d["spec"]["replicas"].as_u64(), Some(3));
        assert_eq!(d["spec"]["template"]["spec"], plain["spec"], "the same Pod spec");
    }
}
