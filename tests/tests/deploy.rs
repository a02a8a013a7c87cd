//! What `deploy/` ships besides the alert rules (operator_assets.rs): the container image
//! (`deploy/image/build`), the Kubernetes manifests (`deploy/kubernetes`) and the systemd
//! units (`deploy/systemd`), each checked with the tool that would reject it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mesh_tests::{free_port, http_status, mesh_bin, run_tool as run, wait_for};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sha256_of(path: &Path) -> String {
    let out = run("sha256sum", &[path.to_str().unwrap()], Path::new("."));
    format!("sha256:{}", out.split_whitespace().next().unwrap())
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

/// Reads a blob named by `descriptor`, checking that its digest and size are what the
/// descriptor says.
fn read_blob(layout: &Path, descriptor: &serde_json::Value) -> Vec<u8> {
    let digest = descriptor["digest"].as_str().unwrap();
    let path = blob(layout, digest);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(sha256_of(&path), digest, "{}", path.display());
    assert_eq!(bytes.len() as u64, descriptor["size"].as_u64().unwrap());
    bytes
}

/// The image script writes a valid OCI layout (every digest and size right, the layer's
/// diff id its unpacked digest), whose config runs `mesh` as the unprivileged user it
/// declares, and whose file system alone, entered as that user, runs a coordinator that
/// answers its probes. (The tests build it from the debug binary, which brings its libraries;
/// the released image holds the static binary: BENCHMARKS.md, "Cluster".)
#[tokio::test]
async fn the_image_is_an_oci_layout_whose_files_alone_run_a_coordinator_as_non_root() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    let archive = dir.path().join("agentmesh.tar");
    let said = run(
        "python3",
        &[
            "deploy/image/build",
            "--binary",
            mesh_bin().to_str().unwrap(),
            "--gzip-level",
            "1",
            "--tag",
            "agentmesh:test",
            "--out",
            layout.to_str().unwrap(),
            "--archive",
            archive.to_str().unwrap(),
        ],
        &root(),
    );
    assert!(said.contains("agentmesh:test"), "{said}");
    assert!(archive.metadata().unwrap().len() > 1_000_000);

    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(marker["imageLayoutVersion"], "1.0.0");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "test"
    );
    let manifest: serde_json::Value = serde_json::from_slice(&read_blob(&layout, entry)).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&read_blob(&layout, &manifest["config"])).unwrap();
    assert_eq!(config["config"]["User"], "10001:10001");
    assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/mesh");
    let layer = &manifest["layers"][0];
    assert_eq!(
        layer["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    read_blob(&layout, layer);
    let packed = blob(&layout, layer["digest"].as_str().unwrap());
    let unpacked = dir.path().join("layer.tar");
    let out = Command::new("gzip")
        .args(["-dc", packed.to_str().unwrap()])
        .output()
        .unwrap();
    std::fs::write(&unpacked, out.stdout).unwrap();
    assert_eq!(
        sha256_of(&unpacked),
        config["rootfs"]["diff_ids"][0].as_str().unwrap()
    );

    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    run(
        "tar",
        &[
            "-xf",
            unpacked.to_str().unwrap(),
            "-C",
            rootfs.to_str().unwrap(),
        ],
        dir.path(),
    );
    // What a container runtime adds: mount points for /proc and /dev.
    for point in ["proc", "dev"] {
        std::fs::create_dir(rootfs.join(point)).unwrap();
    }
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("mesh:x:10001:10001:"), "{passwd}");
    assert!(rootfs.join("etc/ssl/certs/ca-certificates.crt").exists());

    // The image's files and nothing of the host's: a coordinator as uid 10001, its data
    // directory and /tmp the only writable places (as a pod with a read-only root has them).
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let (grpc, http) = (free_port(), free_port());
    let (listen, http_listen) = (format!("127.0.0.1:{grpc}"), format!("127.0.0.1:{http}"));
    let rootfs_arg = rootfs.to_str().unwrap();
    let data_arg = data.to_str().unwrap();
    let mut args = vec![
        "--ro-bind",
        rootfs_arg,
        "/",
        "--bind",
        data_arg,
        "/var/lib/agentmesh",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--unshare-user",
        "--uid",
        "10001",
        "--gid",
        "10001",
        "--unshare-pid",
        "--die-with-parent",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/local/bin",
        "--setenv",
        "MESH_LOG",
        "info",
        "--chdir",
        "/var/lib/agentmesh",
    ];
    args.extend([
        "/usr/local/bin/mesh",
        "coordinator",
        "--listen",
        &listen,
        "--http-listen",
        &http_listen,
        "--data-dir",
        "/var/lib/agentmesh",
    ]);
    let bwrap = mesh_tests::Proc::spawn(Path::new("bwrap"), "image", dir.path(), &args, &[])
        .expect("bubblewrap is installed (.ci/run does it)");
    wait_for(
        "the coordinator in the image to answer /healthz",
        Duration::from_secs(30),
        || async { (http_status(http, "/healthz") == Some(200)).then_some(()) },
    )
    .await;
    assert_eq!(
        http_status(http, "/livez"),
        Some(200),
        "{}",
        bwrap.log_text()
    );
    // It wrote its store where the image says, as the image's user.
    assert!(
        std::fs::read_dir(&data).unwrap().count() > 0,
        "nothing in the data directory"
    );
}

/// The manifests, rendered as `kubectl apply -k` takes them, are valid against the
/// Kubernetes schemas (strict: no unknown field) and consistent with one another.
#[test]
fn the_kubernetes_manifests_validate_strictly_and_hold_together() {
    let python = root().join("target/py/bin/python");
    assert!(
        python.exists(),
        "{} is missing: scripts/check makes it (with kubernetes-validate)",
        python.display()
    );
    let out = run(
        python.to_str().unwrap(),
        &["deploy/kubernetes/check"],
        &root(),
    );
    assert!(out.contains(", 0 problems"), "{out}");
    for kind in [
        "Deployment/agentmesh-coordinator: valid",
        "Deployment/agentmesh-node: valid",
        "PodDisruptionBudget/agentmesh-coordinator: valid",
        "Service/agentmesh-coordinator: valid",
        "ConfigMap/agentmesh-coordinator: valid",
        "ServiceMonitor/agentmesh",
        "PrometheusRule/agentmesh",
    ] {
        assert!(out.contains(kind), "{kind} missing from: {out}");
    }
}

/// The check refuses a manifest with a misspelt field and a rule set that drifted from
/// deploy/prometheus/alerts.yaml: it can fail.
#[test]
fn the_kubernetes_check_refuses_a_wrong_manifest() {
    let python = root().join("target/py/bin/python");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("deploy");
    run(
        "cp",
        &[
            "-r",
            root().join("deploy").to_str().unwrap(),
            copy.to_str().unwrap(),
        ],
        dir.path(),
    );
    let node = copy.join("kubernetes/node.yaml");
    let text = std::fs::read_to_string(&node).unwrap();
    std::fs::write(&node, text.replace("readinessProbe:", "readinesProbe:")).unwrap();
    let rules = copy.join("kubernetes/monitoring.yaml");
    let text = std::fs::read_to_string(&rules).unwrap();
    std::fs::write(&rules, text.replace("for: 1m", "for: 9m")).unwrap();
    let out = Command::new(&python)
        .arg(copy.join("kubernetes/check"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("'readinesProbe' was unexpected"), "{text}");
    assert!(text.contains("PrometheusRule"), "{text}");
}

/// `systemd-analyze verify` finds nothing to say about the units (any warning fails), with
/// the binary path pointed at the one under test.
#[test]
fn the_systemd_units_verify_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(root().join("deploy/systemd")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("ExecStart=/usr/local/bin/mesh "),
            "{}",
            path.display()
        );
        let unit = dir.path().join(path.file_name().unwrap());
        let bin = mesh_bin();
        std::fs::write(
            &unit,
            text.replace("/usr/local/bin/mesh", bin.to_str().unwrap()),
        )
        .unwrap();
        units.push(unit.to_str().unwrap().to_owned());
    }
    assert_eq!(units.len(), 2, "{units:?}");
    let mut args = vec!["verify"];
    args.extend(units.iter().map(String::as_str));
    let out = Command::new("systemd-analyze")
        .args(&args)
        .output()
        .expect("systemd-analyze is installed (.ci/run does it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.trim().is_empty(), "systemd-analyze verify: {said}");
}
