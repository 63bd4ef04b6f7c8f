//! `deploy/docker/Dockerfile`: base images cannot be pulled here, so the image's entrypoint is
//! smoke-tested as the image runs it: the same binary at `/usr/local/bin/cync-mitm`, the same
//! `ENTRYPOINT` + `CMD`, as the image's user (uid 10001), in its working directory, with the
//! config at `/etc/cync-mitm/cync-mitm.toml` — those paths made in a private mount namespace
//! (overlays over /etc, /var/lib and /usr/local/bin: the host is not touched). Its
//! `HEALTHCHECK` command must then pass, the certificates land in the certs volume, owned by
//! that user, keys 0600, and SIGTERM ends it with exit 0. Needs root (CI runs as root).

mod common;

use common::harness::start_cloud;
use common::tshark::have_tool;
use cync_mitm::sim::cloud::CloudSimConfig;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn dockerfile() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/docker/Dockerfile"))
        .unwrap()
}

/// The JSON array after `directive` (`ENTRYPOINT`, `CMD`, or `HEALTHCHECK`'s `CMD`).
fn exec_form(text: &str, directive: &str) -> Vec<String> {
    let joined = text.replace("\\\n", " ");
    let line = joined
        .lines()
        .rfind(|l| l.starts_with(directive))
        .unwrap_or_else(|| panic!("no {directive} in the Dockerfile"));
    let json = &line[line.find('[').unwrap()..=line.rfind(']').unwrap()];
    serde_json::from_str(json).unwrap()
}

fn directive(text: &str, name: &str) -> String {
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name}"))
        .trim()
        .to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_dockerfile_runs_the_proxy_unprivileged_with_a_health_check() {
    let d = dockerfile();
    assert_eq!(
        exec_form(&d, "ENTRYPOINT"),
        vec!["/usr/local/bin/cync-mitm"]
    );
    assert_eq!(
        exec_form(&d, "CMD"),
        vec!["run", "--config", "/etc/cync-mitm/cync-mitm.toml"]
    );
    assert_eq!(
        exec_form(&d, "HEALTHCHECK"),
        vec![
            "/usr/local/bin/cync-mitm",
            "healthcheck",
            "--config",
            "/etc/cync-mitm/cync-mitm.toml"
        ]
    );
    assert_eq!(directive(&d, "USER"), "10001:10001");
    assert_eq!(directive(&d, "WORKDIR"), "/var/lib/cync-mitm");
    assert!(d.contains("libssl3"), "the OpenSSL runtime library");
    assert!(d.contains("COPY config/cync-mitm.toml /etc/cync-mitm/cync-mitm.toml"));
    let vols = directive(&d, "VOLUME");
    for v in ["/var/lib/cync-mitm/certs", "/var/lib/cync-mitm/captures"] {
        assert!(vols.contains(v), "{vols}");
    }
    // Every file the build stage copies exists.
    for l in d
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = l.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(
                Path::new(env!("CARGO_MANIFEST_DIR")).join(src).exists(),
                "{l}: {src} is missing"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_entrypoint_runs_as_its_user_with_its_paths_and_passes_its_health_check() {
    if !rustix::process::geteuid().is_root() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI runs as root"
        );
        eprintln!("skipped: needs root (mount namespace, setpriv)");
        return;
    }
    for tool in ["unshare", "setpriv", "nsenter"] {
        if !have_tool(tool, "--version") {
            return;
        }
    }
    let host_before = (
        Path::new("/usr/local/bin/cync-mitm").exists(),
        Path::new("/etc/cync-mitm").exists(),
    );
    let d = dockerfile();
    let entry = exec_form(&d, "ENTRYPOINT");
    let cmd = exec_form(&d, "CMD");
    let health = exec_form(&d, "HEALTHCHECK");
    let (uid, gid) = directive(&d, "USER")
        .split_once(':')
        .map(|(u, g)| (u.to_owned(), g.to_owned()))
        .unwrap();
    let workdir = directive(&d, "WORKDIR");

    // The shipped config, as a user mounts it, with loopback addresses only.
    let (_cloud, cloud) = start_cloud(CloudSimConfig::default()).await;
    let mut cfg = cync_mitm::config::Config::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cync-mitm.toml"),
    )
    .unwrap();
    let (tls_port, admin_port) = (free_port(), free_port());
    cfg.listen.tls = format!("127.0.0.1:{tls_port}").parse().unwrap();
    cfg.admin.listen = format!("127.0.0.1:{admin_port}").parse().unwrap();
    cfg.upstream.addresses = vec![cloud.to_string()];
    cfg.new_path.addresses = Vec::new();
    let scratch = tempfile::tempdir().unwrap();
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let conf = scratch.path().join("cync-mitm.toml");
    std::fs::write(&conf, cfg.to_toml()).unwrap();
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ovl = scratch.path().join("ovl");
    let mut mounts = String::new();
    for (i, dir) in ["/etc", "/var/lib", "/usr/local/bin"].iter().enumerate() {
        let (u, w) = (ovl.join(format!("u{i}")), ovl.join(format!("w{i}")));
        std::fs::create_dir_all(&u).unwrap();
        std::fs::create_dir_all(&w).unwrap();
        mounts.push_str(&format!(
            "mount -t overlay overlay -o lowerdir={dir},upperdir={},workdir={} {dir} && ",
            u.display(),
            w.display()
        ));
    }
    // What the image's RUN and COPY lines make, then its ENTRYPOINT + CMD as its USER.
    let script = format!(
        "{mounts}install -d -o {uid} -g {gid} -m 0700 {workdir} {workdir}/certs {workdir}/captures && \
         install -d -m 0755 /etc/cync-mitm && install -m 0644 {conf} /etc/cync-mitm/cync-mitm.toml && \
         install -m 0755 {bin} /usr/local/bin/cync-mitm && cd {workdir} && \
         exec setpriv --reuid={uid} --regid={gid} --clear-groups --inh-caps=-all {run}",
        conf = conf.display(),
        bin = env!("CARGO_BIN_EXE_cync-mitm"),
        run = entry
            .iter()
            .chain(&cmd)
            .cloned()
            .collect::<Vec<_>>()
            .join(" "),
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    // Whatever fails below, the proxy does not outlive the test.
    struct KillOnDrop(String);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = Command::new("kill").args(["-KILL", &self.0]).status();
        }
    }
    let guard = KillOnDrop(pid.clone());
    // The HEALTHCHECK, run inside the container's view, as its user.
    let check = |extra: &[&str]| {
        let line = format!(
            "cd {workdir} && exec setpriv --reuid={uid} --regid={gid} --clear-groups {} {}",
            health.join(" "),
            extra.join(" ")
        );
        Command::new("nsenter")
            .args(["--mount", "--target", &pid, "sh", "-c", &line])
            .output()
            .unwrap()
    };
    let mut healthy = None;
    let mut last = String::new();
    for _ in 0..100 {
        if let Ok(Some(st)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the entrypoint exited ({st}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = check(&[]);
        if out.status.success() {
            healthy = Some(String::from_utf8_lossy(&out.stdout).into_owned());
            break;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if healthy.is_none() {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "the health check never passed: {last}\nproxy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(healthy.as_deref(), Some("ok\n"));
    let ready = check(&["--ready"]);
    assert!(
        ready.status.success(),
        "{}",
        String::from_utf8_lossy(&ready.stderr)
    );
    // Certificates minted in the certs volume, by the image's user, keys 0600.
    let certs = ovl.join("u1").join("cync-mitm/certs");
    let key = certs.join("server-rsa-key.pem");
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.uid().to_string(), uid);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // The device port is open.
    let device = tokio::net::TcpStream::connect(("127.0.0.1", tls_port)).await;
    assert!(device.is_ok(), "the device port is not open: {device:?}");
    drop(device);
    // SIGTERM drains and exits 0 (the health check then fails).
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    // Reaped: its pid may be reused, so no kill on the way out.
    std::mem::forget(guard);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing was made on the host itself.
    assert_eq!(
        (
            Path::new("/usr/local/bin/cync-mitm").exists(),
            Path::new("/etc/cync-mitm").exists()
        ),
        host_before
    );
}

#[test]
fn hadolint_passes_the_dockerfiles() {
    if !have_tool("hadolint", "--version") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("hadolint")
        .arg(root.join("deploy/docker/Dockerfile"))
        .arg(root.join("deploy/compose/dnsmasq/Dockerfile"))
        .arg(root.join("deploy/homeassistant/Dockerfile"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
