//! The packages (`cargo xtask package`, run by `cargo xtask test` before the tests): contents,
//! metadata and scripts of the .deb and .rpm for both architectures, and a real `dpkg -i` /
//! `dpkg --purge` of the x86_64 .deb on this machine, with `systemd-analyze verify` on the
//! installed units.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use blkmirror_tests::require_root;

fn packages() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/packages")
}

fn package(name_end: &str) -> PathBuf {
    let found = fs::read_dir(packages())
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(name_end));
    found.unwrap_or_else(|| {
        panic!(
            "no package *{name_end} in {}: run `cargo xtask package --debug` (cargo xtask test does)",
            packages().display()
        )
    })
}

fn output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The ELF machine of the file `path` inside `deb`.
fn elf_machine_in_deb(deb: &Path) -> u16 {
    let scratch = blkmirror_tests::Scratch::new();
    let dir = scratch.path.join("extracted");
    output(
        "dpkg-deb",
        &[
            "-x",
            deb.to_str().expect("utf-8"),
            dir.to_str().expect("utf-8"),
        ],
    );
    let bytes = fs::read(dir.join("usr/bin/blkmirror")).expect("binary");
    assert_eq!(&bytes[..4], b"\x7fELF");
    u16::from_le_bytes([bytes[18], bytes[19]])
}

#[test]
fn debs_hold_the_binary_units_and_conffiles_and_never_start_a_service() {
    for (arch, machine) in [("amd64", 62u16), ("arm64", 183)] {
        let deb = package(&format!("_{arch}.deb"));
        let path = deb.to_str().expect("utf-8");
        let listing = output("dpkg-deb", &["-c", path]);
        for (mode, file) in [
            ("-rwxr-xr-x root/root", "./usr/bin/blkmirror"),
            (
                "-rw-r--r-- root/root",
                "./lib/systemd/system/blkmirror-agent.service",
            ),
            (
                "-rw-r--r-- root/root",
                "./lib/systemd/system/blkmirror-receiver.service",
            ),
            (
                "-rw-r--r-- root/root",
                "./lib/systemd/system/blkmirror-drills.service",
            ),
            (
                "-rw-r--r-- root/root",
                "./lib/systemd/system/blkmirror-drills.timer",
            ),
            (
                "-rw-r--r-- root/root",
                "./lib/systemd/system/blkmirror-drills.path",
            ),
            ("-rw-r----- root/root", "./etc/blkmirror/agent.toml"),
            (
                "-rwxr-xr-x root/root",
                "./usr/share/blkmirror/hooks/postgresql-pre-freeze",
            ),
            ("-rw-r----- root/root", "./etc/blkmirror/receiver.toml"),
            ("drwxr-x--- root/root", "./etc/blkmirror/"),
        ] {
            assert!(
                listing
                    .lines()
                    .any(|l| l.starts_with(mode) && l.ends_with(file)),
                "{arch}: no {mode} {file} in\n{listing}"
            );
        }
        let info = output("dpkg-deb", &["-I", path]);
        assert!(info.contains(&format!("Architecture: {arch}")), "{info}");
        assert!(info.contains("Package: blkmirror"), "{info}");
        let conffiles = output("dpkg-deb", &["-f", path, "Package"]);
        assert_eq!(conffiles.trim(), "blkmirror");
        let scratch = blkmirror_tests::Scratch::new();
        let control = scratch.path.join("control");
        output("dpkg-deb", &["-e", path, control.to_str().expect("utf-8")]);
        let conffiles = fs::read_to_string(control.join("conffiles")).expect("conffiles");
        assert!(conffiles.contains("/etc/blkmirror/agent.toml"));
        assert!(conffiles.contains("/etc/blkmirror/receiver.toml"));
        for script in ["postinst", "prerm", "postrm"] {
            let text = fs::read_to_string(control.join(script)).expect(script);
            // What the scripts run, not the advice they print.
            let text: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("echo"))
                .collect::<Vec<_>>()
                .join("\n");
            assert!(
                !text.contains("enable"),
                "{script} enables a service:\n{text}"
            );
            assert!(
                !text.contains("systemctl start") && !text.contains("--now"),
                "{script} starts a service:\n{text}"
            );
        }
        let postinst = fs::read_to_string(control.join("postinst")).expect("postinst");
        assert!(postinst.contains("daemon-reload"));
        assert_eq!(elf_machine_in_deb(&deb), machine, "{arch} binary");
    }
}

#[test]
fn rpms_hold_the_binary_units_and_noreplace_configs() {
    for arch in ["x86_64", "aarch64"] {
        let rpm = package(&format!(".{arch}.rpm"));
        let path = rpm.to_str().expect("utf-8");
        let files = output("rpm", &["-qpl", path]);
        for file in [
            "/usr/bin/blkmirror",
            "/usr/lib/systemd/system/blkmirror-agent.service",
            "/usr/lib/systemd/system/blkmirror-receiver.service",
            "/usr/lib/systemd/system/blkmirror-drills.service",
            "/usr/lib/systemd/system/blkmirror-drills.timer",
            "/usr/lib/systemd/system/blkmirror-drills.path",
            "/usr/share/blkmirror/hooks/mysql-post-thaw",
            "/etc/blkmirror/agent.toml",
            "/etc/blkmirror/receiver.toml",
        ] {
            assert!(
                files.lines().any(|l| l == file),
                "{arch}: no {file} in\n{files}"
            );
        }
        let configs = output("rpm", &["-qpc", path]);
        assert!(configs.contains("/etc/blkmirror/agent.toml"), "{configs}");
        let noreplace = output(
            "rpm",
            &["-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", path],
        );
        assert!(
            noreplace
                .lines()
                .any(|l| l.starts_with("/etc/blkmirror/agent.toml") && l.contains('n')),
            "agent.toml is not %config(noreplace):\n{noreplace}"
        );
        assert_eq!(output("rpm", &["-qp", "--qf", "%{ARCH}", path]), arch);
        let scripts = output("rpm", &["-qp", "--scripts", path]);
        let scripts: String = scripts
            .lines()
            .filter(|l| !l.trim_start().starts_with("echo"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(scripts.contains("daemon-reload"), "{scripts}");
        assert!(!scripts.contains("enable"), "{scripts}");
        assert!(!scripts.contains("systemctl start"), "{scripts}");
    }
}

/// Purges the package on drop, whatever happened.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "blkmirror"]).output();
    }
}

#[test]
fn the_deb_installs_verifies_and_purges_cleanly() {
    require_root();
    let installed_before = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "blkmirror"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("installed"))
        .unwrap_or(false);
    assert!(
        !installed_before,
        "blkmirror is installed on this machine; this test installs and purges its own package \
         and will not touch an operator's installation"
    );
    let pins = Path::new("/sys/fs/bpf/blkmirror");
    assert!(
        !pins.exists(),
        "{} exists: real tracking state; refusing to purge it",
        pins.display()
    );
    let deb = package("_amd64.deb");
    let guard = Installed;
    output("dpkg", &["-i", deb.to_str().expect("utf-8")]);

    let version = output("/usr/bin/blkmirror", &["--version"]);
    assert!(version.starts_with("blkmirror "), "{version}");
    for (path, mode) in [
        ("/usr/bin/blkmirror", 0o755),
        ("/lib/systemd/system/blkmirror-agent.service", 0o644),
        ("/etc/blkmirror", 0o750),
        ("/etc/blkmirror/agent.toml", 0o640),
    ] {
        let meta = fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{path}");
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            0,
            "{path} owner"
        );
    }
    // The services run as root by design (the agent needs CAP_BPF and CAP_SYS_ADMIN); the
    // package adds no system user.
    assert!(
        !Command::new("getent")
            .args(["passwd", "blkmirror"])
            .status()
            .expect("getent")
            .success()
    );
    // The units are valid as installed.
    let verify = Command::new("systemd-analyze")
        .args([
            "verify",
            "/lib/systemd/system/blkmirror-agent.service",
            "/lib/systemd/system/blkmirror-receiver.service",
            "/lib/systemd/system/blkmirror-drills.service",
            "/lib/systemd/system/blkmirror-drills.timer",
            "/lib/systemd/system/blkmirror-drills.path",
        ])
        .output()
        .expect("systemd-analyze");
    let verify_text = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {verify_text}"
    );
    assert!(
        !verify_text.contains("blkmirror-"),
        "systemd-analyze verify: {verify_text}"
    );
    // The shipped configuration is refused until the operator fills it in.
    let check = Command::new("/usr/bin/blkmirror")
        .args(["config", "check", "/etc/blkmirror/agent.toml"])
        .output()
        .expect("config check");
    assert_eq!(check.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&check.stderr).contains("receiver.fingerprint"));

    // Reinstalling (an upgrade in place) keeps an operator's edits to the conffiles.
    let edited = format!(
        "{}\n# edited by the operator\n",
        fs::read_to_string("/etc/blkmirror/agent.toml").expect("agent.toml")
    );
    fs::write("/etc/blkmirror/agent.toml", &edited).expect("edit");
    output("dpkg", &["-i", deb.to_str().expect("utf-8")]);
    assert_eq!(
        fs::read_to_string("/etc/blkmirror/agent.toml").expect("agent.toml"),
        edited,
        "reinstalling replaced an edited conffile"
    );

    // Remove keeps the conffiles; purge removes them and the tracking pins.
    output("dpkg", &["-r", "blkmirror"]);
    assert!(!Path::new("/usr/bin/blkmirror").exists());
    assert!(
        Path::new("/etc/blkmirror/agent.toml").exists(),
        "remove dropped a conffile"
    );
    blkmirror::tracker::environment::ensure_bpffs().expect("bpffs");
    fs::create_dir(pins).expect("a pin directory in bpffs");
    output("dpkg", &["--purge", "blkmirror"]);
    assert!(
        !Path::new("/etc/blkmirror").exists(),
        "purge left /etc/blkmirror"
    );
    assert!(!pins.exists(), "purge left the pins");
    drop(guard);
}

#[test]
fn the_rpm_installs_into_a_scratch_root_and_erases() {
    require_root();
    let scratch = blkmirror_tests::Scratch::new();
    let root = scratch.path.join("root");
    fs::create_dir_all(&root).expect("root");
    let root_arg = root.to_str().expect("utf-8");
    let rpm = package(".x86_64.rpm");
    output("rpm", &["--root", root_arg, "--initdb"]);
    // Scripts would run systemctl inside the scratch root; they are inspected separately.
    output(
        "rpm",
        &[
            "--root",
            root_arg,
            "-i",
            "--nodeps",
            "--noscripts",
            rpm.to_str().expect("utf-8"),
        ],
    );
    for (path, mode) in [
        ("usr/bin/blkmirror", 0o755),
        ("usr/lib/systemd/system/blkmirror-agent.service", 0o644),
        ("etc/blkmirror", 0o750),
        ("etc/blkmirror/receiver.toml", 0o640),
    ] {
        let meta = fs::metadata(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{path}");
    }
    let version = output(
        root.join("usr/bin/blkmirror").to_str().expect("utf-8"),
        &["--version"],
    );
    assert!(version.starts_with("blkmirror "), "{version}");
    output(
        "rpm",
        &["--root", root_arg, "-e", "--noscripts", "blkmirror"],
    );
    assert!(
        !root.join("usr/bin/blkmirror").exists(),
        "erase left the binary"
    );
}
