//! Manifest builders for tests: Pods running `ferry echo`, Services, slices.

/// A Pod running the echo server on TCP and UDP 8080, ready once TCP 8080 accepts.
/// `readiness_file`: if given, the Pod is ready only while that file does not exist.
pub fn echo_pod(name: &str, app: &str, readiness_file: Option<&str>) -> String {
    let readiness = match readiness_file {
        Some(f) => format!(
            "exec:\n              command: [\"sh\", \"-c\", \"test ! -e {f}\"]\n            failureThreshold: 1"
        ),
        None => "tcpSocket:\n              port: http".to_string(),
    };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels:
    app: {app}
spec:
  terminationGracePeriodSeconds: 1
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
            {readiness}
            periodSeconds: 1
"#
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
      terminationGracePeriodSeconds: 1
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
            tcpSocket:
              port: http
            periodSeconds: 1
"#
    )
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
