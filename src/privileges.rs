//! `[server] user` and `group` (DESIGN.md §8): tarmac binds its listeners (port 25) as root,
//! then becomes an unprivileged user for everything else, so a flaw in the code that reads
//! network input runs with that user's rights, not root's.
//!
//! Names are looked up in `/etc/passwd` and `/etc/group` themselves, never through NSS: the
//! system resolver (LDAP, systemd-userdb, ...) must not be asked, and a service account is a
//! local one. The drop is [`Account::become_it`]: the supplementary groups (the chosen group and
//! every `/etc/group` entry listing the user, as `initgroups(3)` would make them), then the
//! real, effective and saved group ID, then the three user IDs; all three at once, so no saved
//! ID can take root back, and the kernel clears every capability with the last step. The one
//! exception is asked for by name: a transparent gateway with `spoof_source` opens every
//! downstream connection from its client's address, which takes `CAP_NET_ADMIN` each time
//! (DESIGN.md §9), so [`Account::become_it`] can keep exactly the capabilities it is given
//! (`PR_SET_KEEPCAPS` across the ID change, then `capset` down to them) and checks that
//! nothing else survived.
//!
//! rustix's calls are the kernel's, which on Linux change the calling *thread* only (the C
//! library's `setuid` signals every thread to do the same). tarmac drops before it starts any
//! thread, and [`Account::become_it`] refuses when the process already has more than one, so
//! the one thread's change is the whole process's. This keeps the crate free of `unsafe` and of
//! a second system-call crate.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use rustix::process::{Gid, Uid};
use rustix::thread::{CapabilitySet, CapabilitySets};

/// The user database, read from this file (not through NSS).
pub const PASSWD: &str = "/etc/passwd";
/// The group database, read from this file.
pub const GROUP: &str = "/etc/group";

/// The IDs tarmac runs as after the drop, resolved from `[server] user` and `group`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// The user's name, for log lines.
    pub user: String,
    /// Its user ID.
    pub uid: u32,
    /// The group: `[server] group`, or the user's primary group.
    pub gid: u32,
    /// The supplementary groups: `gid` and every group whose member list names the user.
    pub groups: Vec<u32>,
}

impl Account {
    /// Looks `user` (and `group`, or the user's primary group when it is empty) up in the
    /// system's `/etc/passwd` and `/etc/group`. The error says which name is missing and where
    /// it was looked for, for `tarmac check` and the start-up error.
    pub fn lookup(user: &str, group: &str) -> Result<Account, String> {
        let passwd = std::fs::read_to_string(PASSWD).map_err(|e| format!("{PASSWD}: {e}"))?;
        let groups = std::fs::read_to_string(GROUP).map_err(|e| format!("{GROUP}: {e}"))?;
        Account::lookup_in(user, group, &passwd, &groups)
    }

    /// [`Account::lookup`] over the given file contents (`passwd(5)` and `group(5)` lines).
    pub fn lookup_in(
        user: &str,
        group: &str,
        passwd: &str,
        groups: &str,
    ) -> Result<Account, String> {
        let (uid, primary) = passwd
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let _password = fields.next()?;
                let uid = fields.next()?.parse::<u32>().ok()?;
                let gid = fields.next()?.parse::<u32>().ok()?;
                (name == user).then_some((uid, gid))
            })
            .next()
            .ok_or_else(|| format!("no user {user:?} in {PASSWD}"))?;
        let entries: Vec<(&str, u32, &str)> = groups
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let _password = fields.next()?;
                let gid = fields.next()?.parse::<u32>().ok()?;
                Some((name, gid, fields.next().unwrap_or("")))
            })
            .collect();
        let gid = if group.is_empty() {
            primary
        } else {
            entries
                .iter()
                .find(|(name, _, _)| *name == group)
                .map(|(_, gid, _)| *gid)
                .ok_or_else(|| format!("no group {group:?} in {GROUP}"))?
        };
        let mut supplementary = vec![gid];
        for (_, id, members) in &entries {
            if members.split(',').any(|m| m.trim() == user) && !supplementary.contains(id) {
                supplementary.push(*id);
            }
        }
        Ok(Account {
            user: user.to_owned(),
            uid,
            gid,
            groups: supplementary,
        })
    }

    /// Creates `state_dir` (mode 0700) if it is missing and gives it, and everything in it
    /// (the snapshots, `spool/`), to this account, so that the state saved at stop belongs to
    /// it. Symbolic links are changed themselves, never followed. Run as root, before
    /// [`Account::become_it`].
    pub fn own_state_dir(&self, state_dir: &Path) -> io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)?;
        self.chown_tree(state_dir)
    }

    fn chown_tree(&self, path: &Path) -> io::Result<()> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))?;
        let metadata = std::fs::symlink_metadata(path)?;
        if metadata.is_dir() {
            for entry in std::fs::read_dir(path)? {
                self.chown_tree(&entry?.path())?;
            }
        }
        Ok(())
    }

    /// Becomes this account for good: supplementary groups, then real, effective and saved
    /// group IDs, then user IDs; then checks that it took. `keep` names the capabilities that
    /// stay permitted and effective afterwards (empty: none, as `setresuid` leaves them);
    /// the check then covers them too. Refuses (changing nothing) when the process has more
    /// than one thread, since each call changes only the calling thread.
    pub fn become_it(&self, keep: CapabilitySet) -> io::Result<()> {
        let threads = thread_count()?;
        if threads != 1 {
            return Err(io::Error::other(format!(
                "cannot become user {}: {threads} threads are running and the change would \
                 reach only this one (privileges are dropped before any thread starts)",
                self.user
            )));
        }
        let groups: Vec<Gid> = self.groups.iter().map(|&g| Gid::from_raw(g)).collect();
        let gid = Gid::from_raw(self.gid);
        let uid = Uid::from_raw(self.uid);
        let step = |what: &str, e: rustix::io::Errno| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot become user {} ({what}): {e}", self.user),
            )
        };
        if !keep.is_empty() {
            // Otherwise the last step below empties the permitted set, and nothing could be
            // kept afterwards.
            rustix::thread::set_keep_capabilities(true).map_err(|e| step("PR_SET_KEEPCAPS", e))?;
        }
        rustix::thread::set_thread_groups(&groups).map_err(|e| step("setgroups", e))?;
        rustix::thread::set_thread_res_gid(gid, gid, gid).map_err(|e| step("setresgid", e))?;
        rustix::thread::set_thread_res_uid(uid, uid, uid).map_err(|e| step("setresuid", e))?;
        if !keep.is_empty() {
            rustix::thread::set_keep_capabilities(false).map_err(|e| step("PR_SET_KEEPCAPS", e))?;
            let sets = CapabilitySets {
                effective: keep,
                permitted: keep,
                inheritable: CapabilitySet::empty(),
            };
            rustix::thread::set_capabilities(None, sets)
                .map_err(|e| step(&format!("capset keeping {keep:?}"), e))?;
        }
        let kept = rustix::thread::capabilities(None).map_err(|e| step("capget", e))?;
        if kept.permitted != keep || kept.effective != keep || !kept.inheritable.is_empty() {
            return Err(io::Error::other(format!(
                "became user {} but its capabilities are {:?}, not {keep:?}",
                self.user, kept
            )));
        }
        if rustix::process::getuid() != uid
            || rustix::process::geteuid() != uid
            || rustix::process::getgid() != gid
            || rustix::process::getegid() != gid
        {
            return Err(io::Error::other(format!(
                "became user {} but the IDs did not change",
                self.user
            )));
        }
        Ok(())
    }
}

impl Account {
    /// Whether the process already runs as this account's user (started unprivileged as it).
    pub fn is_current(&self) -> bool {
        rustix::process::geteuid().as_raw() == self.uid
    }
}

/// Whether the process runs with root's effective user ID.
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The number of threads of this process (`/proc/self/task` has one entry per thread).
fn thread_count() -> io::Result<usize> {
    let tasks = std::fs::read_dir("/proc/self/task").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot count threads in /proc/self/task: {e}"),
        )
    })?;
    Ok(tasks.count())
}

/// Who owns `path` (user and group IDs), for the start-up log line and tests' messages.
pub fn owner(path: &Path) -> io::Result<(u32, u32)> {
    let metadata = std::fs::symlink_metadata(path)?;
    Ok((metadata.uid(), metadata.gid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD_TEXT: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # a comment line is not an entry\n\
        broken line\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        tarmac:x:998:997::/var/lib/tarmac:/usr/sbin/nologin\n";
    const GROUP_TEXT: &str = "root:x:0:\n\
        ssl-cert:x:110:postfix,tarmac\n\
        nogroup:x:65534:\n\
        tarmac:x:997:\n\
        mail:x:8: tarmac \n";

    #[test]
    fn user_with_its_primary_group_and_memberships() {
        let account = Account::lookup_in("tarmac", "", PASSWD_TEXT, GROUP_TEXT).unwrap();
        assert_eq!(
            account,
            Account {
                user: "tarmac".into(),
                uid: 998,
                gid: 997,
                groups: vec![997, 110, 8],
            }
        );
    }

    #[test]
    fn a_named_group_replaces_the_primary_one() {
        let account = Account::lookup_in("nobody", "nogroup", PASSWD_TEXT, GROUP_TEXT).unwrap();
        assert_eq!((account.uid, account.gid), (65534, 65534));
        assert_eq!(account.groups, [65534]);
        let account = Account::lookup_in("tarmac", "ssl-cert", PASSWD_TEXT, GROUP_TEXT).unwrap();
        assert_eq!(account.gid, 110);
        assert_eq!(account.groups, [110, 8]);
    }

    #[test]
    fn missing_names_say_where_they_were_looked_for() {
        assert_eq!(
            Account::lookup_in("postfix", "", PASSWD_TEXT, GROUP_TEXT),
            Err(format!("no user \"postfix\" in {PASSWD}"))
        );
        assert_eq!(
            Account::lookup_in("nobody", "wheel", PASSWD_TEXT, GROUP_TEXT),
            Err(format!("no group \"wheel\" in {GROUP}"))
        );
        // A prefix or a line that does not parse is no match.
        assert!(Account::lookup_in("tar", "", PASSWD_TEXT, GROUP_TEXT).is_err());
        assert!(Account::lookup_in("broken line", "", PASSWD_TEXT, GROUP_TEXT).is_err());
    }

    #[test]
    fn the_state_dir_is_made_and_given_away() {
        let dir = std::env::temp_dir().join(format!("tarmac-privs-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = dir.join("a").join("state");
        let me = Account {
            user: "me".into(),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            groups: Vec::new(),
        };
        // Owning to oneself needs no privilege, so this runs as any user.
        me.own_state_dir(&state).unwrap();
        std::fs::create_dir(state.join("spool")).unwrap();
        std::fs::write(state.join("spool").join("f"), b"x").unwrap();
        std::os::unix::fs::symlink("/nonexistent", state.join("link")).unwrap();
        me.own_state_dir(&state).unwrap();
        assert_eq!(
            owner(&state.join("spool").join("f")).unwrap(),
            (me.uid, me.gid)
        );
        assert_eq!(
            std::fs::metadata(&state).unwrap().mode() & 0o777,
            0o700,
            "created private"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_drop_with_threads_running() {
        // The unit-test harness runs each test on a thread of its own: this process has more
        // than one. The account is the current one, so nothing would change even if it went on.
        let account = Account {
            user: "me".into(),
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            groups: Vec::new(),
        };
        let err = account.become_it(CapabilitySet::empty()).unwrap_err();
        assert!(err.to_string().contains("threads are running"), "{err}");
    }
}
