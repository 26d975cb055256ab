//! Who may do what at the DR site: operator roles, checked by the receiver daemon for every
//! request on its control socket.
//!
//! Recovery actions are powerful. A role is granted through Unix groups named in
//! `receiver.toml`'s `[roles]` section, and the daemon learns who is asking from the socket's
//! peer credentials (`SO_PEERCRED`), which the kernel fills in and a client cannot forge:
//!
//! * `viewer`: `status`, `points`;
//! * `operator`: the viewer's, plus `restore`, `verify` and `export`;
//! * `admin`: everything, including `failover` and `reprotect`.
//!
//! Root is admin. A user in no listed group has no role and is refused. Every request is
//! audited with the user, the role used and the outcome, refusals included.
//!
//! The decision ([`RoleMap::authorize`]) is pure; [`peer_identity`] looks the user and their
//! groups up through the C library (so NSS sources such as LDAP count).

use std::ffi::CStr;

use serde::{Deserialize, Serialize};

/// A role, weakest first (a stronger role may do what a weaker one may).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Status and points.
    Viewer,
    /// Restore and verify.
    Operator,
    /// Failover, reprotect.
    Admin,
}

impl Role {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// What a control-socket request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The status board.
    Status,
    /// The points of a volume.
    Points,
    /// Verify points.
    Verify,
    /// Restore a point (streamed to the client, which writes its target).
    Restore,
    /// Serve a point over NBD on a Unix socket only the client may use, while it stays
    /// connected.
    Export,
    /// Ask for a drill (queued for the drill runner, which runs it with the volume's
    /// configured check).
    Drill,
    /// Fail over (promote a point, raise the term).
    Failover,
    /// Serve a failover's export, whose writes go back to the source at failback.
    ExportPromoted,
    /// Make the source primary again.
    Reprotect,
}

impl Action {
    /// The weakest role that may do it.
    pub fn required(self) -> Role {
        match self {
            Action::Status | Action::Points => Role::Viewer,
            Action::Verify | Action::Restore | Action::Export | Action::Drill => Role::Operator,
            Action::Failover | Action::Reprotect | Action::ExportPromoted => Role::Admin,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Action::Status => "status",
            Action::Points => "points",
            Action::Verify => "verify",
            Action::Restore => "restore",
            Action::Export => "export",
            Action::Drill => "drill",
            Action::Failover => "failover",
            Action::ExportPromoted => "export --promoted",
            Action::Reprotect => "reprotect",
        }
    }
}

/// The `[roles]` section: Unix groups per role.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleMap {
    /// Groups whose members are viewers.
    pub viewer: Vec<String>,
    /// Groups whose members are operators.
    pub operator: Vec<String>,
    /// Groups whose members are admins.
    pub admin: Vec<String>,
}

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The user id (from the kernel).
    pub uid: u32,
    /// The user name, or `uid N` when it has none.
    pub name: String,
    /// The names of the user's groups (primary and supplementary).
    pub groups: Vec<String>,
}

impl RoleMap {
    /// Whether any role is granted: without one, only root may use the control socket, as
    /// before roles existed.
    pub fn is_empty(&self) -> bool {
        self.viewer.is_empty() && self.operator.is_empty() && self.admin.is_empty()
    }

    /// The strongest role `peer` holds.
    pub fn role_of(&self, peer: &Peer) -> Option<Role> {
        if peer.uid == 0 {
            return Some(Role::Admin);
        }
        let member = |groups: &[String]| groups.iter().any(|g| peer.groups.contains(g));
        if member(&self.admin) {
            Some(Role::Admin)
        } else if member(&self.operator) {
            Some(Role::Operator)
        } else if member(&self.viewer) {
            Some(Role::Viewer)
        } else {
            None
        }
    }

    /// The role `peer` uses for `action`, or the refusal to send (and audit).
    pub fn authorize(&self, peer: &Peer, action: Action) -> Result<Role, String> {
        let needed = action.required();
        match self.role_of(peer) {
            Some(role) if role >= needed => Ok(role),
            Some(role) => Err(format!(
                "{} is {} {}; {} needs the {} role (groups: {})",
                peer.name,
                article(role),
                role.name(),
                action.name(),
                needed.name(),
                self.groups_of(needed).join(", ")
            )),
            None => Err(format!(
                "{} has no role on this receiver; {} needs the {} role (groups: {})",
                peer.name,
                action.name(),
                needed.name(),
                self.groups_of(needed).join(", ")
            )),
        }
    }

    /// The groups that grant `role` or a stronger one.
    fn groups_of(&self, role: Role) -> Vec<String> {
        let mut groups = self.admin.clone();
        if role <= Role::Operator {
            groups.extend(self.operator.iter().cloned());
        }
        if role <= Role::Viewer {
            groups.extend(self.viewer.iter().cloned());
        }
        if groups.is_empty() {
            groups.push("root only".into());
        }
        groups
    }
}

fn article(role: Role) -> &'static str {
    match role {
        Role::Admin | Role::Operator => "an",
        Role::Viewer => "a",
    }
}

/// Looks up `uid`'s name and groups (`None` fields when the user database has no entry: the
/// peer then has only what a uid grants, which is admin for root and nothing otherwise).
pub fn peer_identity(uid: u32) -> Peer {
    let mut buffer = vec![0u8; 16 * 1024];
    // SAFETY: a zeroed `passwd` is a valid value of this plain C struct.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: `entry` and `found` are locals, and the
    // buffer's length is passed with it; the strings written point into `buffer`, which
    // outlives their use below.
    let status = unsafe {
        libc::getpwuid_r(
            uid,
            &mut entry,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            &mut found,
        )
    };
    if status != 0 || found.is_null() {
        return Peer {
            uid,
            name: format!("uid {uid}"),
            groups: Vec::new(),
        };
    }
    // SAFETY: getpwuid_r succeeded, so `pw_name` is a NUL-terminated string in `buffer`.
    let name = unsafe { CStr::from_ptr(entry.pw_name) }
        .to_string_lossy()
        .into_owned();
    let mut gids: Vec<libc::gid_t> = vec![0; 256];
    let mut count = gids.len() as libc::c_int;
    // SAFETY: `entry.pw_name` is NUL-terminated (above); `gids` holds `count` entries, and
    // getgrouplist writes at most that many (it returns -1 and the needed count otherwise).
    let listed =
        unsafe { libc::getgrouplist(entry.pw_name, entry.pw_gid, gids.as_mut_ptr(), &mut count) };
    if listed < 0 {
        count = gids.len() as libc::c_int;
    }
    gids.truncate(count.max(0) as usize);
    let groups = gids.into_iter().filter_map(group_name).collect();
    Peer {
        uid,
        name: format!("{name} (uid {uid})"),
        groups,
    }
}

fn group_name(gid: libc::gid_t) -> Option<String> {
    let mut buffer = vec![0u8; 16 * 1024];
    // SAFETY: a zeroed `group` is a valid value of this plain C struct.
    let mut entry: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as for getpwuid_r above: locals and a buffer with its length.
    let status = unsafe {
        libc::getgrgid_r(
            gid,
            &mut entry,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            &mut found,
        )
    };
    if status != 0 || found.is_null() {
        return None;
    }
    // SAFETY: getgrgid_r succeeded, so `gr_name` is a NUL-terminated string in `buffer`.
    Some(
        unsafe { CStr::from_ptr(entry.gr_name) }
            .to_string_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, groups: &[&str]) -> Peer {
        Peer {
            uid,
            name: format!("u{uid}"),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    fn roles() -> RoleMap {
        RoleMap {
            viewer: vec!["dr-view".into()],
            operator: vec!["dr-ops".into()],
            admin: vec!["dr-admin".into()],
        }
    }

    #[test]
    fn each_role_may_do_its_own_and_weaker_actions_only() {
        let roles = roles();
        let viewer = peer(1000, &["users", "dr-view"]);
        let operator = peer(1001, &["dr-ops"]);
        let admin = peer(1002, &["dr-admin", "dr-view"]);
        let nobody = peer(1003, &["users"]);
        assert_eq!(roles.authorize(&viewer, Action::Points), Ok(Role::Viewer));
        let refused = roles.authorize(&viewer, Action::Restore).unwrap_err();
        assert!(refused.contains("u1000 is a viewer"), "{refused}");
        assert!(
            refused.contains("restore needs the operator role"),
            "{refused}"
        );
        assert!(refused.contains("dr-admin, dr-ops"), "{refused}");
        assert_eq!(
            roles.authorize(&operator, Action::Restore),
            Ok(Role::Operator)
        );
        assert_eq!(
            roles.authorize(&operator, Action::Status),
            Ok(Role::Operator)
        );
        let refused = roles.authorize(&operator, Action::Failover).unwrap_err();
        assert!(
            refused.contains("failover needs the admin role"),
            "{refused}"
        );
        assert_eq!(roles.authorize(&admin, Action::Failover), Ok(Role::Admin));
        let refused = roles.authorize(&nobody, Action::Status).unwrap_err();
        assert!(refused.contains("has no role"), "{refused}");
        // Root is admin whatever its groups.
        assert_eq!(
            roles.authorize(&peer(0, &[]), Action::Reprotect),
            Ok(Role::Admin)
        );
        // Without [roles], only root.
        assert!(RoleMap::default().is_empty());
        let refused = RoleMap::default()
            .authorize(&viewer, Action::Status)
            .unwrap_err();
        assert!(refused.contains("root only"), "{refused}");
    }

    #[test]
    fn root_is_found_in_the_user_database() {
        let root = peer_identity(0);
        assert!(root.name.starts_with("root"), "{root:?}");
        assert!(root.groups.iter().any(|g| g == "root"), "{root:?}");
    }
}
