//! Checks the deployment files without an engine or a cluster: the
//! Kubernetes manifests as kustomize would assemble them (every workload has
//! probes on ports it serves, requests and limits, a Service and a
//! PodDisruptionBudget; every reference resolves), the Dockerfiles and the
//! compose file.

use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read_yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            <Value as serde::Deserialize>::deserialize(d)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(v, path)?.as_str()
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn seq<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    get(v, path)
        .and_then(Value::as_sequence)
        .map_or(&[], Vec::as_slice)
}

/// What a kustomization yields: its resources (with generated ConfigMaps,
/// strategic patches applied to containers' env and replicas) and namespace.
#[derive(Default)]
struct Built {
    resources: Vec<Value>,
    config_maps: BTreeMap<String, BTreeSet<String>>,
}

fn build(dir: &Path) -> Built {
    let k = read_yaml_docs(&dir.join("kustomization.yaml"))
        .pop()
        .unwrap_or_else(|| panic!("{} has no kustomization.yaml", dir.display()));
    assert_eq!(s(&k, &["kind"]), Some("Kustomization"), "{}", dir.display());
    let mut out = Built::default();
    for r in seq(&k, &["resources"]) {
        let rel = r.as_str().expect("resource paths are strings");
        let path = dir.join(rel);
        assert!(
            path.exists(),
            "{} names {rel}, which does not exist",
            dir.display()
        );
        if path.is_dir() {
            let sub = build(&path);
            out.resources.extend(sub.resources);
            for (name, keys) in sub.config_maps {
                out.config_maps.entry(name).or_default().extend(keys);
            }
        } else {
            out.resources.extend(read_yaml_docs(&path));
        }
    }
    for g in seq(&k, &["configMapGenerator"]) {
        let name = s(g, &["name"]).expect("generator name").to_string();
        let merge = s(g, &["behavior"]) == Some("merge");
        assert!(
            !merge || out.config_maps.contains_key(&name),
            "{}: merge into unknown ConfigMap {name}",
            dir.display()
        );
        let keys = out.config_maps.entry(name).or_default();
        for lit in seq(g, &["literals"]) {
            let (key, _) = lit
                .as_str()
                .and_then(|l| l.split_once('='))
                .expect("literals are KEY=value");
            keys.insert(key.to_string());
        }
    }
    for p in seq(&k, &["patches"]) {
        let rel = s(p, &["path"]).expect("patches name a path");
        let path = dir.join(rel);
        assert!(
            path.exists(),
            "{} patches with missing {rel}",
            dir.display()
        );
        for patch in read_yaml_docs(&path) {
            let (kind, name) = (s(&patch, &["kind"]), s(&patch, &["metadata", "name"]));
            let target = out
                .resources
                .iter_mut()
                .find(|r| s(r, &["kind"]) == kind && s(r, &["metadata", "name"]) == name)
                .unwrap_or_else(|| panic!("{rel} patches {kind:?} {name:?}, not in the base"));
            apply_patch(target, &patch);
        }
    }
    out
}

/// The parts of a strategic merge patch these manifests use: replicas,
/// containers' env merged by name, volumeClaimTemplates replaced.
fn apply_patch(target: &mut Value, patch: &Value) {
    if let Some(r) = get(patch, &["spec", "replicas"]) {
        target["spec"]["replicas"] = r.clone();
    }
    if let Some(v) = get(patch, &["spec", "volumeClaimTemplates"]) {
        target["spec"]["volumeClaimTemplates"] = v.clone();
    }
    for pc in seq(patch, &["spec", "template", "spec", "containers"]) {
        let containers = target["spec"]["template"]["spec"]["containers"]
            .as_sequence_mut()
            .expect("containers");
        let c = containers
            .iter_mut()
            .find(|c| c["name"] == pc["name"])
            .expect("patched container exists");
        for e in seq(pc, &["env"]) {
            let env = c["env"].as_sequence_mut().expect("env");
            env.retain(|x| x["name"] != e["name"]);
            env.push(e.clone());
        }
    }
}

fn port_of_listen(value: &str) -> Option<u64> {
    value.rsplit_once(':')?.1.parse().ok()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Every rule a workload must meet; returns what is wrong.
fn check(built: &Built, what: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let by_kind = |kind: &'static str| {
        built
            .resources
            .iter()
            .filter(move |r| s(r, &["kind"]) == Some(kind))
    };
    let workloads: Vec<&Value> = by_kind("Deployment")
        .chain(by_kind("StatefulSet"))
        .collect();
    if workloads.is_empty() {
        errors.push(format!("{what}: no workloads"));
    }
    for w in workloads {
        let name = s(w, &["metadata", "name"]).unwrap_or("?");
        let pod = &w["spec"]["template"];
        let labels = &pod["metadata"]["labels"];
        if !labels_match(&w["spec"]["selector"]["matchLabels"], labels) {
            errors.push(format!("{what}/{name}: selector does not match its pods"));
        }
        if get(pod, &["spec", "securityContext", "runAsNonRoot"]) != Some(&Value::Bool(true)) {
            errors.push(format!("{what}/{name}: not runAsNonRoot"));
        }
        let services: Vec<&Value> = by_kind("Service")
            .filter(|svc| labels_match(&svc["spec"]["selector"], labels))
            .collect();
        if services.is_empty() {
            errors.push(format!("{what}/{name}: no Service selects it"));
        }
        if !by_kind("PodDisruptionBudget")
            .any(|p| labels_match(&p["spec"]["selector"]["matchLabels"], labels))
        {
            errors.push(format!("{what}/{name}: no PodDisruptionBudget covers it"));
        }
        let mut volumes: BTreeSet<&str> = seq(pod, &["spec", "volumes"])
            .iter()
            .filter_map(|v| s(v, &["name"]))
            .collect();
        volumes.extend(
            seq(w, &["spec", "volumeClaimTemplates"])
                .iter()
                .filter_map(|v| s(v, &["metadata", "name"])),
        );
        let mut named_ports: BTreeMap<&str, u64> = BTreeMap::new();
        for c in seq(pod, &["spec", "containers"]) {
            let cname = s(c, &["name"]).unwrap_or("?");
            let at = format!("{what}/{name}/{cname}");
            let ports: BTreeMap<&str, u64> = seq(c, &["ports"])
                .iter()
                .filter_map(|p| Some((s(p, &["name"])?, p["containerPort"].as_u64()?)))
                .collect();
            named_ports.extend(ports.iter().map(|(k, v)| (*k, *v)));
            // A port is served when a *_LISTEN setting binds it, and every
            // listener is declared.
            let listening: BTreeSet<u64> = seq(c, &["env"])
                .iter()
                .filter(|e| s(e, &["name"]).is_some_and(|n| n.ends_with("LISTEN")))
                .filter_map(|e| port_of_listen(s(e, &["value"])?))
                .collect();
            let declared: BTreeSet<u64> = ports.values().copied().collect();
            if listening != declared {
                errors.push(format!(
                    "{at}: container ports {declared:?} but it listens on {listening:?}"
                ));
            }
            for probe in ["livenessProbe", "readinessProbe"] {
                let Some(p) = c.get(probe) else {
                    errors.push(format!("{at}: no {probe}"));
                    continue;
                };
                let path = s(p, &["httpGet", "path"]);
                let port = s(p, &["httpGet", "port"]);
                let want = if probe == "livenessProbe" {
                    "/healthz"
                } else {
                    "/ready"
                };
                if path != Some(want) {
                    errors.push(format!("{at}: {probe} checks {path:?}, not {want}"));
                }
                if port.is_none_or(|p| !ports.contains_key(p)) {
                    errors.push(format!(
                        "{at}: {probe} port {port:?} is not a container port"
                    ));
                }
            }
            for kind in ["requests", "limits"] {
                for res in ["cpu", "memory"] {
                    if get(c, &["resources", kind, res]).is_none() {
                        errors.push(format!("{at}: no resources.{kind}.{res}"));
                    }
                }
            }
            for m in seq(c, &["volumeMounts"]) {
                let v = s(m, &["name"]).unwrap_or("?");
                if !volumes.contains(v) {
                    errors.push(format!("{at}: mounts undeclared volume {v}"));
                }
            }
            for e in seq(c, &["env"]) {
                if let Some(r) = get(e, &["valueFrom", "configMapKeyRef"]) {
                    let (cm, key) = (s(r, &["name"]).unwrap_or(""), s(r, &["key"]).unwrap_or(""));
                    if !built.config_maps.get(cm).is_some_and(|k| k.contains(key)) {
                        errors.push(format!("{at}: ConfigMap {cm} has no key {key}"));
                    }
                }
            }
        }
        for svc in services {
            for p in seq(svc, &["spec", "ports"]) {
                let target = &p["targetPort"];
                let served = match target {
                    Value::String(n) => named_ports.contains_key(n.as_str()),
                    Value::Number(n) => named_ports.values().any(|v| Some(*v) == n.as_u64()),
                    _ => false,
                };
                if !served {
                    errors.push(format!(
                        "{what}/{}: targetPort {target:?} is not served by {name}",
                        s(svc, &["metadata", "name"]).unwrap_or("?")
                    ));
                }
            }
        }
    }
    errors
}

#[test]
fn kubernetes_manifests_are_complete() {
    let k8s = deploy().join("k8s");
    let mut errors = Vec::new();
    let mut overlays = 0;
    for entry in std::fs::read_dir(k8s.join("overlays")).expect("overlays") {
        let dir = entry.expect("entry").path();
        let built = build(&dir);
        let region = dir.file_name().unwrap().to_string_lossy().to_string();
        // The overlay's namespace is the region's.
        let k = read_yaml_docs(&dir.join("kustomization.yaml"))
            .pop()
            .unwrap();
        assert_eq!(
            s(&k, &["namespace"]),
            Some(format!("homecell-{region}").as_str()),
            "overlay {region}"
        );
        errors.extend(check(&built, &format!("overlays/{region}")));
        overlays += 1;
    }
    assert!(overlays >= 2, "one overlay per region, found {overlays}");
    errors.extend(check(&build(&k8s.join("control-plane")), "control-plane"));
    errors.extend(check(
        &build(&k8s.join("control-plane-postgres")),
        "control-plane-postgres",
    ));
    assert!(
        errors.is_empty(),
        "manifest problems:\n{}",
        errors.join("\n")
    );
}

#[test]
fn the_postgres_control_plane_runs_three_instances_with_the_url_from_a_secret() {
    let built = build(&deploy().join("k8s/control-plane-postgres"));
    let cp = built
        .resources
        .iter()
        .find(|r| {
            s(r, &["metadata", "name"]) == Some("control-plane")
                && s(r, &["kind"]) == Some("StatefulSet")
        })
        .expect("control plane");
    assert_eq!(cp["spec"]["replicas"].as_u64(), Some(3));
    let env = seq(cp, &["spec", "template", "spec", "containers"])[0]["env"]
        .as_sequence()
        .unwrap();
    let url = env
        .iter()
        .find(|e| e["name"] == "HOMECELL_CP_STORE__POSTGRES")
        .expect("the store's URL");
    assert!(get(url, &["value"]).is_none(), "never inline: {url:?}");
    assert!(s(url, &["valueFrom", "secretKeyRef", "name"]).is_some());
    let advertise = env
        .iter()
        .find(|e| e["name"] == "HOMECELL_CP_STORE__ADVERTISE")
        .expect("each instance's own endpoint in status");
    let pod_ip = env.iter().position(|e| e["name"] == "POD_IP");
    let at = env
        .iter()
        .position(|e| e["name"] == "HOMECELL_CP_STORE__ADVERTISE");
    assert!(pod_ip < at, "$(POD_IP) is defined before its use");
    assert_eq!(s(advertise, &["value"]), Some("https://$(POD_IP):7443"));
    let pdb = built
        .resources
        .iter()
        .find(|r| s(r, &["kind"]) == Some("PodDisruptionBudget"))
        .expect("a PDB");
    assert_eq!(pdb["spec"]["maxUnavailable"].as_u64(), Some(1));
}

#[test]
fn the_postgres_overlay_runs_several_cell_instances() {
    let built = build(&deploy().join("k8s/overlays/eu-west"));
    let cell = built
        .resources
        .iter()
        .find(|r| {
            s(r, &["kind"]) == Some("StatefulSet") && s(r, &["metadata", "name"]) == Some("cell")
        })
        .expect("cell");
    assert!(cell["spec"]["replicas"].as_u64() > Some(1));
    let env = seq(cell, &["spec", "template", "spec", "containers"])[0]["env"]
        .as_sequence()
        .unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "HOMECELL_CELL_DATABASE_URL")
    );
    // The instances share one seal for the signing keys, from the secret
    // the cell already mounts.
    let seal = env
        .iter()
        .find(|e| e["name"] == "HOMECELL_CELL_SIGNING_KEY_SEAL_FILE")
        .expect("a shared seal");
    assert!(
        s(seal, &["value"]).is_some_and(|v| v.starts_with("/etc/homecell/tls/")),
        "{seal:?}"
    );
    // Headless: the name resolves to every instance, for the routers.
    let svc = built
        .resources
        .iter()
        .find(|r| s(r, &["kind"]) == Some("Service") && s(r, &["metadata", "name"]) == Some("cell"))
        .expect("cell service");
    assert_eq!(s(svc, &["spec", "clusterIP"]), Some("None"));
}

#[test]
fn the_checker_catches_a_missing_probe_and_an_unserved_port() {
    let mut built = build(&deploy().join("k8s/overlays/cn-east"));
    assert!(check(&built, "ok").is_empty());
    let router = built
        .resources
        .iter_mut()
        .find(|r| s(r, &["kind"]) == Some("Deployment"))
        .unwrap();
    let c = &mut router["spec"]["template"]["spec"]["containers"][0];
    c.as_mapping_mut().unwrap().remove("readinessProbe");
    c["ports"][0]["containerPort"] = Value::from(9999);
    let errors = check(&built, "broken").join("\n");
    assert!(errors.contains("no readinessProbe"), "{errors}");
    assert!(errors.contains("listens on"), "{errors}");
}

#[test]
fn dockerfiles_run_unprivileged_with_health_checks() {
    for bin in ["control-plane", "region-router", "cell"] {
        let path = deploy().join(format!("docker/{bin}.Dockerfile"));
        let text = std::fs::read_to_string(&path).expect("Dockerfile");
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
        assert!(
            has("ARG BASE_IMAGE=debian:bookworm-slim"),
            "{bin}: base is a build arg"
        );
        assert!(has("USER homecell"), "{bin}: runs as homecell");
        assert!(has("HEALTHCHECK"), "{bin}: health check");
        assert!(
            text.contains(&format!("CMD [\"{bin}\"")),
            "{bin}: the health check runs the binary's probe"
        );
        assert!(
            has(&format!("ENTRYPOINT [\"tini\", \"--\", \"{bin}\"]")),
            "{bin}: tini as PID 1"
        );
    }
}

#[test]
fn the_postgres_compose_override_keeps_the_house_rules_and_no_secret() {
    let path = deploy().join("compose.postgres.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut doc = read_yaml_docs(&path).pop().unwrap();
    // Its instances share one definition through YAML merge keys.
    doc.apply_merge().unwrap();
    let base = read_yaml_docs(&deploy().join("compose.yaml"))
        .pop()
        .unwrap();
    let services = doc["services"].as_mapping().unwrap();
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        // Its own services restart as the base's do (the ones it only
        // amends keep the base's policy).
        if base["services"].get(name).is_none() {
            assert_eq!(s(svc, &["restart"]), Some("on-failure:5"), "{name}");
        }
    }
    for cp in ["control-plane", "control-plane-2", "control-plane-3"] {
        assert!(services.contains_key(cp), "{cp}");
    }
    // The password is made at first start, never written here.
    assert!(!text.contains("postgres://homecell:") || text.contains("$$(cat "));
    assert!(
        !text.to_lowercase().contains("password:"),
        "no inline password"
    );
}

#[test]
fn compose_file_follows_the_house_rules() {
    let path = deploy().join("compose.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let doc = read_yaml_docs(&path).pop().unwrap();
    assert!(doc.get("version").is_none(), "no version: key");
    let services = doc["services"].as_mapping().unwrap();
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        assert_eq!(s(svc, &["restart"]), Some("on-failure:5"), "{name}");
        // Blank line before every service but the first.
        let at = text.find(&format!("\n  {name}:\n")).expect("service line");
        if services.keys().next().and_then(Value::as_str) != Some(name) {
            assert!(text[..at].ends_with('\n'), "{name}: a blank line before it");
        }
    }
    // Every datastore is a named volume.
    let named: BTreeSet<&str> = doc["volumes"]
        .as_mapping()
        .unwrap()
        .keys()
        .filter_map(Value::as_str)
        .collect();
    for svc in ["control-plane", "cell-cn-east", "cell-eu-west", "router"] {
        let data = seq(&doc, &["services", svc, "volumes"])
            .iter()
            .filter_map(Value::as_str)
            .find(|v| v.ends_with(":/var/lib/homecell"))
            .unwrap_or_else(|| panic!("{svc} keeps /var/lib/homecell on a volume"));
        let vol = data.split(':').next().unwrap();
        assert!(named.contains(vol), "{svc}: {vol} is a named volume");
    }
    // Least privilege for keys: each component reads a pki volume of its
    // own, read-only; only `pki` sees the CA's key.
    let mut pki_volumes = BTreeSet::new();
    for svc in [
        "control-plane",
        "regions",
        "cell-cn-east",
        "cell-eu-west",
        "router",
    ] {
        let mounts: Vec<&str> = seq(&doc, &["services", svc, "volumes"])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let pki = mounts
            .iter()
            .find(|v| v.contains(":/etc/homecell/pki"))
            .unwrap_or_else(|| panic!("{svc} mounts its pki volume"));
        assert!(pki.ends_with(":ro"), "{svc}: {pki} is read-only");
        let vol = pki.split(':').next().unwrap();
        assert!(
            pki_volumes.insert(vol),
            "{svc}: {vol} is shared with another component"
        );
        assert!(
            !mounts.iter().any(|v| v.starts_with("pki-ca:")),
            "{svc} must not see the CA's key"
        );
    }
}

/// The Prometheus files agree with what they scrape and what they alert
/// on: the compose config's targets are compose services on their image's
/// admin port, every job the alert rules select is scraped by both configs,
/// and the Kubernetes config keeps pods by labels and a port name that the
/// manifests carry. (Debian's promtool checks the compose config and the
/// rules, but is built without Kubernetes discovery.)
#[test]
fn the_prometheus_configs_scrape_what_the_deployments_run() {
    let dir = deploy().join("prometheus");
    let compose = read_yaml_docs(&deploy().join("compose.yaml")).remove(0);
    let admin_port = |image: &str| -> String {
        let file = match image {
            "cell" => "cell",
            "region-router" => "region-router",
            "control-plane" => "control-plane",
            other => panic!("no image {other}"),
        };
        let text = std::fs::read_to_string(deploy().join(format!("docker/{file}.Dockerfile")))
            .expect("Dockerfile");
        text.lines()
            .find_map(|l| l.strip_prefix("ARG ADMIN_PORT="))
            .unwrap_or_else(|| panic!("{file}.Dockerfile has no ADMIN_PORT"))
            .trim()
            .to_string()
    };
    let prom = read_yaml_docs(&dir.join("prometheus.compose.yml")).remove(0);
    let mut jobs = BTreeSet::new();
    for job in seq(&prom, &["scrape_configs"]) {
        let name = s(job, &["job_name"]).expect("job_name");
        jobs.insert(name.to_string());
        for sc in seq(job, &["static_configs"]) {
            for t in seq(sc, &["targets"]) {
                let (host, port) = t
                    .as_str()
                    .and_then(|t| t.split_once(':'))
                    .expect("host:port");
                let image = s(&compose, &["services", host, "image"])
                    .unwrap_or_else(|| panic!("{host} is not a compose service"));
                let image = image
                    .trim_start_matches("homecell/")
                    .split(':')
                    .next()
                    .unwrap_or_default();
                assert_eq!(
                    port,
                    admin_port(image),
                    "{host} is scraped off its admin port"
                );
                // A router's metrics carry `region` themselves: a target
                // label would rename theirs to exported_region.
                assert_eq!(
                    s(sc, &["labels", "region"]).is_some(),
                    name == "homecell-cell",
                    "{host}: only cells take a region target label"
                );
            }
        }
    }
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).expect("alerts.yml");
    let selected: BTreeSet<String> = rules
        .split("job=\"")
        .skip(1)
        .filter_map(|r| r.split('"').next())
        .map(String::from)
        .collect();
    assert!(!selected.is_empty());
    for job in &selected {
        assert!(
            jobs.contains(job),
            "the compose config scrapes no job {job}"
        );
    }

    let k8s = read_yaml_docs(&dir.join("prometheus.k8s.yml")).remove(0);
    let relabel = seq(&k8s, &["scrape_configs"])[0].clone();
    let relabel = seq(&relabel, &["relabel_configs"]);
    let keep = |source: &str| -> String {
        relabel
            .iter()
            .find(|r| {
                s(r, &["action"]) == Some("keep")
                    && seq(r, &["source_labels"]).first().and_then(Value::as_str) == Some(source)
            })
            .and_then(|r| s(r, &["regex"]))
            .unwrap_or_else(|| panic!("no keep on {source}"))
            .to_string()
    };
    let names_regex = keep("__meta_kubernetes_pod_label_app_kubernetes_io_name");
    let names: Vec<&str> = names_regex
        .trim_matches(|c| c == '(' || c == ')')
        .split('|')
        .collect();
    for job in &selected {
        let name = job.strip_prefix("homecell-").expect("homecell- job");
        assert!(names.contains(&name), "the Kubernetes config drops {job}");
    }
    assert_eq!(keep("__meta_kubernetes_pod_container_port_name"), "admin");
    assert_eq!(keep("__meta_kubernetes_namespace"), "homecell-.+");
    for (namespaced, manifest) in [
        ("k8s/overlays/cn-east", "k8s/base/cell.yaml"),
        ("k8s/overlays/eu-west", "k8s/base/router.yaml"),
        ("k8s/control-plane", "k8s/control-plane/control-plane.yaml"),
    ] {
        let k = read_yaml_docs(&deploy().join(namespaced).join("kustomization.yaml")).remove(0);
        assert!(
            s(&k, &["namespace"]).is_some_and(|n| n.starts_with("homecell-")),
            "{namespaced} deploys into a homecell-* namespace"
        );
        let workload = read_yaml_docs(&deploy().join(manifest))
            .into_iter()
            .find(|d| matches!(s(d, &["kind"]), Some("StatefulSet" | "Deployment")))
            .expect("a workload");
        let name = s(
            &workload,
            &[
                "spec",
                "template",
                "metadata",
                "labels",
                "app.kubernetes.io/name",
            ],
        )
        .expect("a name label");
        assert!(names.contains(&name), "{manifest}: {name} is not scraped");
        let ports: Vec<&str> = seq(&workload, &["spec", "template", "spec", "containers"])
            .iter()
            .flat_map(|c| seq(c, &["ports"]))
            .filter_map(|p| s(p, &["name"]))
            .collect();
        assert!(ports.contains(&"admin"), "{manifest} names its admin port");
    }
}
