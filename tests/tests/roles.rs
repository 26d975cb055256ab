//! Operator roles at the DR site, as root: real Unix users and groups made for the test, a
//! receiver whose `receiver.toml` maps groups to roles, and the recovery commands run as those
//! users through the control socket (`--control-socket`). Refusals are clear and audited.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use blkmirror_tests::{
    LoopDevice, PinRoot, Scratch, blkmirror_bin,
    mirror::{AgentSetup, ChildGuard, Id, Receiver, digest, last_point, write_random},
    require_root, run_ok, sh,
};

const MIB: u64 = 1 << 20;

/// Users and groups made for the test; deleted on drop.
struct Accounts {
    users: Vec<String>,
    groups: Vec<String>,
}

impl Accounts {
    fn group(&mut self, name: &str) {
        let status = Command::new("groupadd")
            .arg(name)
            .status()
            .expect("groupadd");
        assert!(status.success(), "groupadd {name}");
        self.groups.push(name.to_owned());
    }

    fn user(&mut self, name: &str, group: &str) {
        let status = Command::new("useradd")
            .args(["-M", "-N", "-s", "/usr/sbin/nologin", "-g", group, name])
            .status()
            .expect("useradd");
        assert!(status.success(), "useradd {name}");
        self.users.push(name.to_owned());
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for user in &self.users {
            let _ = Command::new("userdel").arg(user).output();
        }
        for group in &self.groups {
            let _ = Command::new("groupdel").arg(group).output();
        }
    }
}

/// Runs the copied binary as `user`.
fn run_as(user: &str, bin: &Path, args: &[&str]) -> Output {
    Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(bin)
        .args(args)
        .output()
        .expect("runuser")
}

/// Starts `bin ARGS` as `user` (an export through the control socket) and returns it with
/// the first line of its output (the export's URI).
fn serve_as(user: &str, bin: &Path, args: &[&str]) -> (ChildGuard, String) {
    use std::io::BufRead as _;
    let mut child = ChildGuard(
        Command::new("runuser")
            .args(["-u", user, "--"])
            .arg(bin)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("runuser"),
    );
    let mut line = String::new();
    std::io::BufReader::new(child.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the first line");
    (child, line.trim().to_owned())
}

/// Stops what `serve_as` started: SIGTERM, which `runuser` passes on to the command (a SIGKILL
/// would leave the command running, and its export with it).
fn stop_as(mut child: ChildGuard) {
    blkmirror_tests::signal(child.0.id(), libc::SIGTERM);
    let _ = child.0.wait();
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn roles_decide_who_may_restore_and_fail_over_and_every_refusal_is_audited() {
    require_root();
    let scratch = Scratch::new();
    let tag = std::process::id() % 100_000;
    let (viewers, operators, admins) = (
        format!("bmv{tag}"),
        format!("bmo{tag}"),
        format!("bma{tag}"),
    );
    let (viewer, operator, admin, nobody) = (
        format!("bmvu{tag}"),
        format!("bmou{tag}"),
        format!("bmau{tag}"),
        format!("bmnu{tag}"),
    );
    let mut accounts = Accounts {
        users: Vec::new(),
        groups: Vec::new(),
    };
    for group in [&viewers, &operators, &admins] {
        accounts.group(group);
    }
    accounts.user(&viewer, &viewers);
    accounts.user(&operator, &operators);
    accounts.user(&admin, &admins);
    accounts.user(&nobody, "users");

    // A place every test user can reach: the binary, the control socket, and a directory per
    // user for their restores.
    let public = PathBuf::from(format!("/tmp/blkmirror-roles-{tag}"));
    let _ = fs::remove_dir_all(&public);
    fs::create_dir_all(&public).expect("public dir");
    fs::set_permissions(&public, fs::Permissions::from_mode(0o755)).expect("chmod");
    let _public_guard = blkmirror_tests::RemoveDir(public.clone());
    let bin = public.join("blkmirror");
    fs::copy(blkmirror_bin(), &bin).expect("copy binary");
    for user in [&viewer, &operator, &admin, &nobody] {
        let home = public.join(user);
        fs::create_dir_all(&home).expect("home");
        let status = Command::new("chown")
            .arg(format!("{user}:"))
            .arg(&home)
            .status()
            .expect("chown");
        assert!(status.success());
    }
    let socket = public.join("control").join("receiver.sock");
    let socket_arg = socket.to_str().expect("utf-8").to_owned();

    let agent_id = Id::new(&scratch.path, "agent-id");
    let receiver_id = Id::new(&scratch.path, "receiver-id");
    let data = scratch.path.join("data");
    let config = scratch.path.join("receiver.toml");
    fs::write(
        &config,
        format!(
            "identity = \"{}\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
             control_socket = \"{socket_arg}\"\n\
             [[agent]]\nfingerprint = \"{}\"\nvolumes = [\"vol\"]\n\
             [roles]\nviewer = [\"{viewers}\"]\noperator = [\"{operators}\"]\n\
             admin = [\"{admins}\"]\n",
            receiver_id.dir.display(),
            data.display(),
            agent_id.fingerprint
        ),
    )
    .expect("config");
    let receiver = Receiver::start_config(&config, &data, &receiver_id);
    let dev = LoopDevice::new(&scratch.path, 64 * MIB);
    // A file system, so that a drill of it can pass; random data after it.
    sh("mkfs.ext4", &["-q", "-F", dev.as_str()]);
    write_random(&dev.path, 48 * MIB, 4 * MIB);
    let pins = PinRoot::new();
    let agent = AgentSetup {
        device: &dev.path,
        volume: "vol",
        receiver: &receiver,
        id: &agent_id,
        pins: &pins,
        state_dir: &scratch.path.join("state"),
        receiver_fingerprint: None,
        via: None,
    };
    let seq = last_point(&agent.once_ok(&[]))["seq"]
        .as_u64()
        .expect("seq");
    let mode = fs::metadata(&socket).expect("socket").permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o666,
        "with roles, every local user may connect"
    );

    // A viewer lists points, and may not restore.
    let out = run_as(
        &viewer,
        &bin,
        &["points", "vol", "--control-socket", &socket_arg],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&seq.to_string()), "{}", text(&out));
    let target = public.join(&viewer).join("vol.img");
    let target_arg = target.to_str().expect("utf-8");
    let out = run_as(
        &viewer,
        &bin,
        &[
            "restore",
            "vol",
            "--at",
            "latest",
            "--to",
            target_arg,
            "--control-socket",
            &socket_arg,
        ],
    );
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(
        text(&out).contains("is a viewer; restore needs the operator role"),
        "{}",
        text(&out)
    );
    assert!(!target.exists());
    // Nor can they read the data directory themselves.
    let out = run_as(
        &viewer,
        &bin,
        &["points", "vol", "--data-dir", data.to_str().expect("utf-8")],
    );
    assert!(!out.status.success(), "{}", text(&out));

    // A user in no role's group gets nothing.
    let out = run_as(
        &nobody,
        &bin,
        &["points", "vol", "--control-socket", &socket_arg],
    );
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(text(&out).contains("has no role"), "{}", text(&out));

    // An operator restores (the daemon streams, the operator's own process writes its file),
    // and may not fail over.
    let target = public.join(&operator).join("vol.img");
    let target_arg = target.to_str().expect("utf-8");
    let out = run_as(
        &operator,
        &bin,
        &[
            "restore",
            "vol",
            "--at",
            &format!("seq:{seq}"),
            "--to",
            target_arg,
            "--control-socket",
            &socket_arg,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        digest(&target),
        digest(&dev.path),
        "the restore is not the device"
    );
    let owner = {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(&target).expect("target").uid()
    };
    assert_ne!(
        owner, 0,
        "the operator's process wrote the file, not the daemon"
    );
    let out = run_as(
        &operator,
        &bin,
        &[
            "verify",
            "vol",
            "--at",
            "all",
            "--control-socket",
            &socket_arg,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    // An operator exports a point: the daemon serves it on a socket only they may use, for
    // as long as their command runs. A viewer may not.
    let out = run_as(
        &viewer,
        &bin,
        &["export", "vol", "--control-socket", &socket_arg],
    );
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(
        text(&out).contains("export needs the operator role"),
        "{}",
        text(&out)
    );
    let (export, uri) = serve_as(
        &operator,
        &bin,
        &[
            "export",
            "vol",
            "--at",
            &format!("seq:{seq}"),
            "--control-socket",
            &socket_arg,
        ],
    );
    assert!(uri.starts_with("nbd+unix:///vol?socket="), "{uri:?}");
    let export_socket = PathBuf::from(uri.split("socket=").nth(1).expect("path"));
    let compare = |user: &str| {
        Command::new("runuser")
            .args([
                "-u", user, "--", "qemu-img", "compare", "-f", "raw", "-F", "raw", &uri,
            ])
            .arg(&target)
            .output()
            .expect("qemu-img")
    };
    let out = compare(&operator);
    assert!(out.status.success(), "{}", text(&out));
    let out = compare(&viewer);
    assert!(
        !out.status.success(),
        "another user read the operator's export"
    );
    stop_as(export);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while export_socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the export outlived its client"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // An operator asks for a drill: the daemon (which has no capabilities) queues it, the
    // drill runner (root; `blkmirror-drills.path` in production) runs it with the check
    // receiver.toml gives, and the operator's command gets the result. A viewer may not, and
    // nobody may name a check command for root to run.
    let out = run_as(
        &viewer,
        &bin,
        &["drill", "vol", "--control-socket", &socket_arg],
    );
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(
        text(&out).contains("drill needs the operator role"),
        "{}",
        text(&out)
    );
    let out = run_as(
        &operator,
        &bin,
        &[
            "drill",
            "vol",
            "--check",
            "id",
            "--control-socket",
            &socket_arg,
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let request = data.join("drill-requests/vol.json");
    let asked = Command::new("runuser")
        .args(["-u", &operator, "--"])
        .arg(&bin)
        .args(["drill", "vol", "--control-socket", &socket_arg])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("drill request");
    let mut asked = ChildGuard(asked);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !request.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon queued no request"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let queued = fs::read_to_string(&request).expect("request");
    assert!(queued.contains(&operator), "{queued}");
    run_ok(&[
        "drill",
        "--due",
        "--config",
        config.to_str().expect("utf-8"),
    ]);
    let out = {
        use std::io::Read as _;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let _ = asked
            .0
            .stdout
            .take()
            .expect("stdout")
            .read_to_end(&mut stdout);
        let _ = asked
            .0
            .stderr
            .take()
            .expect("stderr")
            .read_to_end(&mut stderr);
        Output {
            status: asked.0.wait().expect("wait"),
            stdout,
            stderr,
        }
    };
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("fsck: ok"), "{}", text(&out));
    let record: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("the record"),
    )
    .expect("the drill record");
    assert_eq!(record["ok"], true, "{record}");
    assert!(!request.exists(), "the request stayed queued");

    let promoted = public.join(&operator).join("promoted.img");
    let out = run_as(
        &operator,
        &bin,
        &[
            "failover",
            "vol",
            "--to",
            promoted.to_str().expect("utf-8"),
            "--control-socket",
            &socket_arg,
        ],
    );
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(
        text(&out).contains("is an operator; failover needs the admin role"),
        "{}",
        text(&out)
    );
    assert!(!promoted.exists());

    // An admin fails over (the copy is written before the term changes) and reprotects.
    let promoted = public.join(&admin).join("promoted.img");
    let out = run_as(
        &admin,
        &bin,
        &[
            "failover",
            "vol",
            "--to",
            promoted.to_str().expect("utf-8"),
            "--control-socket",
            &socket_arg,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("term 2"), "{}", text(&out));
    assert_eq!(digest(&promoted), digest(&dev.path));
    let (refused, _) = agent.once(&[], std::time::Duration::from_secs(120));
    assert_eq!(
        refused.status.code(),
        Some(6),
        "the old source is refused after the failover"
    );
    let out = run_as(
        &admin,
        &bin,
        &["reprotect", "vol", "--control-socket", &socket_arg],
    );
    assert!(out.status.success(), "{}", text(&out));
    agent.once_ok(&[]);

    // Hostile requests are refused with what was wrong (as root, who may do anything).
    for (request, expected) in [
        (
            r#"{"action":"verify","volume":"vol","at":"--data-dir=/tmp"}"#,
            "names no point",
        ),
        (r#"{"action":"points","volume":"../etc"}"#, "volume name"),
        (r#"{"action":"shutdown"}"#, "not a request"),
        (
            r#"{"action":"points","volume":"vol","extra":1}"#,
            "not a request",
        ),
    ] {
        use std::io::{Read as _, Write as _};
        let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
        stream
            .write_all(format!("{request}\n").as_bytes())
            .expect("send");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).expect("answer");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.contains("\"code\":2") && answer.contains(expected),
            "{request}: {answer}"
        );
    }

    // An admin fails over into an export through the daemon: it is served on a socket only
    // the admin may use, for as long as the admin's command runs; its writes are kept, and
    // serving it again is an admin's (an operator is refused).
    let (failover, uri) = serve_as(
        &admin,
        &bin,
        &[
            "failover",
            "vol",
            "--to",
            "export",
            "--control-socket",
            &socket_arg,
        ],
    );
    assert!(uri.starts_with("nbd+unix:///vol?socket="), "{uri:?}");
    let qemu_io_as = |user: &str, uri: &str, commands: &[&str]| {
        let mut command = Command::new("runuser");
        command.args(["-u", user, "--", "qemu-io", "-f", "raw"]);
        for c in commands {
            command.args(["-c", c]);
        }
        let out = command.arg(uri).output().expect("qemu-io");
        (
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
            text(&out),
        )
    };
    let (ok, said) = qemu_io_as(&admin, &uri, &["write -P 0x77 2M 64k", "flush"]);
    assert!(ok, "{said}");
    let (ok, _) = qemu_io_as(&operator, &uri, &["read 0 4k"]);
    assert!(!ok, "another user used the admin's promoted export");
    stop_as(failover);
    let out = run_as(
        &operator,
        &bin,
        &[
            "export",
            "vol",
            "--promoted",
            "--control-socket",
            &socket_arg,
        ],
    );
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(
        text(&out).contains("export --promoted needs the admin role"),
        "{}",
        text(&out)
    );
    let (again, uri) = serve_as(
        &admin,
        &bin,
        &[
            "export",
            "vol",
            "--promoted",
            "--control-socket",
            &socket_arg,
        ],
    );
    let (ok, said) = qemu_io_as(&admin, &uri, &["read -P 0x77 2M 64k"]);
    assert!(ok, "the promoted export lost its write: {said}");
    stop_as(again);
    let (refused, _) = agent.once(&[], std::time::Duration::from_secs(120));
    assert_eq!(
        refused.status.code(),
        Some(6),
        "the source after the failover"
    );

    // Every request is in the audit log with its user, role and outcome, refusals included.
    let audit = fs::read_to_string(data.join("audit.log")).expect("audit log");
    let control: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| entry["event"] == "control")
        .collect();
    let find = |user: &str, action: &str, refused: bool| {
        control.iter().any(|entry| {
            entry["detail"]["user"]
                .as_str()
                .is_some_and(|u| u.starts_with(user))
                && entry["detail"]["action"] == action
                && entry["outcome"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("refused"))
                    == refused
        })
    };
    assert!(find(&viewer, "points", false), "{audit}");
    assert!(find(&viewer, "restore", true), "{audit}");
    assert!(find(&nobody, "points", true), "{audit}");
    assert!(find(&operator, "restore", false), "{audit}");
    assert!(find(&operator, "export", false), "{audit}");
    assert!(find(&viewer, "export", true), "{audit}");
    assert!(find(&operator, "failover", true), "{audit}");
    assert!(find(&operator, "drill", false), "{audit}");
    assert!(find(&operator, "export --promoted", true), "{audit}");
    assert!(find(&admin, "export --promoted", false), "{audit}");
    assert!(find(&viewer, "drill", true), "{audit}");
    // The drill itself names who asked for it.
    assert!(
        audit
            .lines()
            .any(|line| line.contains("\"event\":\"drill\"")
                && line.contains(&format!("\"requested_by\":\"{operator} "))
                && line.contains(", operator\"")),
        "{audit}"
    );
    assert!(find(&admin, "failover", false), "{audit}");
    assert!(find(&admin, "reprotect", false), "{audit}");
    // The failover itself names the admin, through the control socket.
    assert!(
        audit
            .lines()
            .any(|line| line.contains("\"event\":\"failover\"") && line.contains(&admin)),
        "{audit}"
    );
    run_ok(&[
        "audit",
        "verify",
        "--data-dir",
        data.to_str().expect("utf-8"),
    ]);
    drop(receiver);
    drop(accounts);
}
