//! Application-consistent points, as root: the agent's `pre_freeze` and `post_thaw` hooks
//! around the freeze of a real ext4 on a loop device, and the shipped PostgreSQL example
//! against a real PostgreSQL server whose data directory is on the replicated file system.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use blkmirror_tests::{
    LoopDevice, Mount, blkmirror,
    mirror::{ChildGuard, Site, last_point},
    parse_lines, require_root, run_ok, sh,
};

const MIB: u64 = 1 << 20;

#[test]
fn hooks_bracket_the_freeze_and_decide_whether_a_point_is_application_consistent() {
    require_root();
    let site = Site::new("fs");
    let data = site.receiver.data_dir.to_str().expect("utf-8").to_owned();
    let dev = LoopDevice::new(&site.scratch.path, 64 * MIB);
    let mount = Mount::mkfs_and_mount(&dev.path, "ext4", &site.scratch.path);
    fs::write(mount.target.join("data"), vec![3u8; 1 << 20]).expect("write");
    let agent = site.setup(&dev.path, "fs");
    let log = site.scratch.path.join("hooks.log");
    // Both hooks write into the mounted file system: that blocks (until the hook times out)
    // if the file system is frozen, so success proves pre_freeze ran before the freeze and
    // post_thaw after the thaw.
    let pre = format!(
        "touch \"$BLKMIRROR_MOUNT/pre-$BLKMIRROR_CYCLE\" && echo pre $BLKMIRROR_CYCLE \
         $BLKMIRROR_VOLUME >> {}",
        log.display()
    );
    let post = format!(
        "touch \"$BLKMIRROR_MOUNT/post-$BLKMIRROR_CYCLE\" && echo post \
         $BLKMIRROR_PRE_FREEZE_OK >> {}",
        log.display()
    );
    let lines = agent.once_ok(&[
        "--pre-freeze",
        &pre,
        "--post-thaw",
        &post,
        "--hook-timeout",
        "20s",
    ]);
    let point = last_point(&lines);
    assert_eq!(point["consistent"], true, "{point}");
    assert_eq!(point["app_consistent"], true, "{point}");
    let seq = point["seq"].as_u64().expect("seq");
    let text = fs::read_to_string(&log).expect("hooks log");
    let ran: Vec<&str> = text.lines().collect();
    assert!(ran.len() >= 2 && ran.len().is_multiple_of(2), "{text}");
    for pair in ran.chunks(2) {
        assert!(
            pair[0].starts_with("pre ") && pair[0].ends_with(" fs"),
            "{text}"
        );
        assert_eq!(pair[1], "post 1", "{text}");
    }
    assert!(text.contains(&format!("pre {seq} fs")), "{text}");
    let listed = parse_lines(&run_ok(&["points", "fs", "--data-dir", &data, "--json"]));
    assert_eq!(listed.last().expect("a point")["app_consistent"], true);
    assert!(run_ok(&["points", "fs", "--data-dir", &data]).contains(" app "));

    // A failing pre_freeze: still frozen (crash-consistent), not application-consistent,
    // and post_thaw still runs, told so.
    fs::write(&log, "").expect("reset the log");
    fs::write(mount.target.join("data"), vec![4u8; 1 << 20]).expect("write");
    let (output, lines) = agent.once(
        &[
            "--pre-freeze",
            "echo refusing; exit 4",
            "--post-thaw",
            &post,
        ],
        Duration::from_secs(180),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let point = last_point(&lines);
    assert_eq!(point["consistent"], true, "{point}");
    assert_eq!(point["app_consistent"], false, "{point}");
    assert!(stderr.contains("pre_freeze failed"), "{stderr}");
    assert!(
        stderr.contains("refusing"),
        "the hook's output is logged: {stderr}"
    );
    assert!(
        fs::read_to_string(&log)
            .expect("log")
            .lines()
            .all(|l| l == "post 0"),
        "post_thaw was not told: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );

    // A pre_freeze that hangs is killed at its timeout; the cycle goes on.
    fs::write(mount.target.join("data"), vec![5u8; 1 << 20]).expect("write");
    let started = Instant::now();
    let lines = agent.once_ok(&["--pre-freeze", "sleep 60", "--hook-timeout", "1s"]);
    let point = last_point(&lines);
    assert_eq!(point["app_consistent"], false, "{point}");
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "{:?}",
        started.elapsed()
    );

    // Hooks without a freeze are a configuration error, said at start.
    let out = blkmirror()
        .args(agent.args(&["--once", "--pre-freeze", "true", "--freeze", "off"]))
        .output()
        .expect("agent");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("freeze"));
}

/// A PostgreSQL server run by the test as user postgres; stopped (immediately) on drop.
struct Postgres {
    data: PathBuf,
    socket: PathBuf,
    port: u16,
}

impl Postgres {
    fn bin(name: &str) -> PathBuf {
        let dir = fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries (package postgresql)")
            .flatten()
            .map(|e| e.path())
            .max()
            .expect("a PostgreSQL version");
        dir.join("bin").join(name)
    }

    fn as_postgres(program: &Path, args: &[&str]) -> String {
        let output = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("runuser");
        assert!(
            output.status.success(),
            "{} {args:?}: {}{}",
            program.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn start(data: PathBuf, socket: PathBuf, port: u16) -> Self {
        fs::create_dir_all(&socket).expect("socket dir");
        sh(
            "chown",
            &["postgres:postgres", socket.to_str().expect("utf-8")],
        );
        let server = Self { data, socket, port };
        Self::as_postgres(
            &Self::bin("pg_ctl"),
            &[
                "-D",
                server.data.to_str().expect("utf-8"),
                "-l",
                server.socket.join("log").to_str().expect("utf-8"),
                "-o",
                &format!(
                    "-p {port} -k {} -c listen_addresses=''",
                    server.socket.display()
                ),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        server
    }

    fn sql(&self, query: &str) -> String {
        Self::as_postgres(
            Path::new("psql"),
            &[
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.socket.to_str().expect("utf-8"),
                "-p",
                &self.port.to_string(),
                "-d",
                "postgres",
                "-c",
                query,
            ],
        )
        .trim()
        .to_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Self::bin("pg_ctl"))
            .args(["-D"])
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// An LSN (`16/B374D848`) as a number.
fn lsn(text: &str) -> u64 {
    let (high, low) = text.trim().split_once('/').expect("an LSN");
    (u64::from_str_radix(high, 16).expect("hex") << 32) | u64::from_str_radix(low, 16).expect("hex")
}

#[test]
fn the_postgresql_example_hook_checkpoints_into_the_point_which_then_starts() {
    require_root();
    let site = Site::new("pg");
    let data = site.receiver.data_dir.to_str().expect("utf-8").to_owned();
    let dev = LoopDevice::new(&site.scratch.path, 256 * MIB);
    let mount = Mount::mkfs_and_mount(&dev.path, "ext4", &site.scratch.path);
    let pgdata = mount.target.join("pg");
    fs::create_dir_all(&pgdata).expect("pgdata");
    sh(
        "chown",
        &["postgres:postgres", pgdata.to_str().expect("utf-8")],
    );
    // The socket directory must be reachable by user postgres (the scratch dir is root's).
    let sockets = PathBuf::from(format!("/tmp/blkmirror-pg-{}", std::process::id()));
    let _remove_sockets = blkmirror_tests::RemoveDir(sockets.clone());
    Postgres::as_postgres(
        &Postgres::bin("initdb"),
        &[
            "-D",
            pgdata.to_str().expect("utf-8"),
            "-A",
            "trust",
            "--no-sync",
        ],
    );
    let port = 25432 + (std::process::id() % 1000) as u16;
    let server = Postgres::start(pgdata.clone(), sockets.join("source"), port);
    server.sql("CREATE TABLE t (id bigserial PRIMARY KEY, v text)");
    server.sql("INSERT INTO t (v) SELECT md5(g::text) FROM generate_series(1, 20000) g");
    // A writer keeps inserting while the point is taken. It stops at its first failed insert
    // (the server is gone), and runs in its own process group, which the guard kills whole:
    // a loop left behind would spin for the rest of the test run.
    let writer = GroupGuard(ChildGuard(
        Command::new("runuser")
            .args(["-u", "postgres", "--", "sh", "-c"])
            .arg(format!(
                "while psql -X -q -h {} -p {port} -d postgres -c \"INSERT INTO t (v) \
                 SELECT md5(random()::text) FROM generate_series(1, 200)\"; do :; done",
                server.socket.display()
            ))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("writer"),
    ));
    std::thread::sleep(Duration::from_secs(1));
    let before = lsn(&server.sql("SELECT pg_current_wal_lsn()"));
    let hook = format!(
        "PGHOST={} PGPORT={port} {}",
        server.socket.display(),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/hooks/postgresql-pre-freeze")
            .display()
    );
    let agent = site.setup(&dev.path, "pg");
    let lines = agent.once_ok(&["--pre-freeze", &hook]);
    let point = last_point(&lines);
    assert_eq!(point["app_consistent"], true, "{point}");
    let seq = point["seq"].as_u64().expect("seq");
    drop(writer);

    // The point, restored elsewhere, is a database that starts, whose last checkpoint is the
    // hook's (after `before`), and that holds the rows committed before the cut.
    let restored = site.scratch.path.join("pg-point.img");
    run_ok(&[
        "restore",
        "pg",
        "--at",
        &format!("seq:{seq}"),
        "--to",
        restored.to_str().expect("utf-8"),
        "--data-dir",
        &data,
    ]);
    let copy = LoopDevice::attach(&restored);
    let target = site.scratch.path.join("pg-point");
    fs::create_dir_all(&target).expect("mount point");
    sh("mount", &[copy.as_str(), target.to_str().expect("utf-8")]);
    let _unmount = blkmirror_tests::mirror::UnmountOnDrop(target.clone());
    let copy_data = target.join("pg");
    let control = Postgres::as_postgres(
        &Postgres::bin("pg_controldata"),
        &[copy_data.to_str().expect("utf-8")],
    );
    let checkpoint = control
        .lines()
        .find_map(|l| l.strip_prefix("Latest checkpoint location:"))
        .map(lsn)
        .expect("a checkpoint location");
    assert!(
        checkpoint >= before,
        "the point's last checkpoint {checkpoint:#x} is older than the hook ({before:#x}):\n{control}"
    );
    // This copy stands for a recovered host: the source's lock file is not its own.
    let _ = fs::remove_file(copy_data.join("postmaster.pid"));
    let recovered = Postgres::start(copy_data, sockets.join("copy"), port + 1);
    let rows: u64 = recovered
        .sql("SELECT count(*) FROM t")
        .parse()
        .expect("a count");
    assert!(rows >= 20000, "{rows} rows");
    eprintln!("the recovered point holds {rows} rows; checkpoint {checkpoint:#x} >= {before:#x}");
    drop(recovered);
    drop(server);
}

/// Kills a child's whole process group on drop (then the child, through its guard).
struct GroupGuard(ChildGuard);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the process group our child leads; no pointers.
        unsafe { libc::kill(-(self.0.0.id() as i32), libc::SIGKILL) };
    }
}
