//! Restore against a simulated kernel that keeps the rules of credentials: which
//! capability each call needs, what `capset` accepts, what a uid change does to the
//! capabilities (unless securebits say otherwise), to dumpable and to the parent-death
//! signal. Checks that the plugin's order takes a root thread to any credentials
//! exactly, and that what the kernel refuses fails the restore in one line.

use std::collections::BTreeMap;

use ferry_plugin_api::{
    abi_stable::std_types::{RResult, RSlice, RSliceMut, RStr, RVec},
    testing::{run_restart, MockMemory, Records},
    util::{FS_BASE, REGS_SIZE},
    MemRange, PResult, PluginError, ProcessContext, Record, RecordFormat, SyscallArgs,
};

use super::*;

const BASE: u64 = 0x10000;
const SCRATCH: usize = 64 * 1024;
const CAP_CHOWN: u32 = 0;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_SYS_MODULE: u32 = 16;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_AUDIT_CONTROL: u32 = 30;
/// Capabilities a filesystem uid change takes from (or gives to) the effective set.
const CAP_FS_MASK: u64 = 0x1f | 1 << 9 | 1 << 32;
const SECBIT_NO_CAP_AMBIENT_RAISE: u64 = 1 << 6;
const SECURE_ALL_LOCKS: u64 = 0xaa;
const SECURE_ALL_BITS: u64 = 0x55;

fn bit(c: u32) -> u64 {
    1 << c
}

#[derive(Clone)]
struct Task {
    creds: Creds,
    fs_base: u64,
}

struct Kernel {
    pid: i32,
    tasks: BTreeMap<i32, Task>,
    mem: MockMemory,
    dumpable: u32,
    oom_score_adj: i32,
    open_loginuid: Option<i32>,
}

fn root(last: u32) -> Creds {
    let all = all_caps(last);
    Creds { cap_effective: all, cap_permitted: all, cap_bounding: all, loginuid: LOGINUID_UNSET, ..Creds::default() }
}

impl Kernel {
    /// A restore child as ferry makes it: every thread root with every capability.
    fn new(tids: &[i32]) -> Kernel {
        let last = cap_last_cap().expect("this kernel's last capability");
        let tasks = tids.iter().map(|&t| (t, Task { creds: root(last), fs_base: 0x7000 + t as u64 })).collect();
        Kernel { pid: tids[0], tasks, mem: MockMemory::new(BASE, SCRATCH), dumpable: 1, oom_score_adj: 0, open_loginuid: None }
    }

    /// What commit_creds does when the effective or fs ids change.
    fn ids_changed(&mut self, tid: i32) {
        self.dumpable = 0;
        self.tasks.get_mut(&tid).unwrap().creds.pdeathsig = 0;
    }

    fn syscall(&mut self, tid: i32, nr: i64, a: [u64; 6]) -> i64 {
        let eperm = -(libc::EPERM as i64);
        let einval = -(libc::EINVAL as i64);
        let old = self.tasks[&tid].creds.clone();
        let capable = |c: u32| old.cap_effective & bit(c) != 0;
        let mut new = old.clone();
        let ret = match nr {
            libc::SYS_prctl => match a[0] {
                PR_GET_SECUREBITS => old.securebits as i64,
                PR_GET_PDEATHSIG => {
                    self.mem.put(a[1], &old.pdeathsig.to_le_bytes());
                    0
                }
                PR_GET_DUMPABLE => self.dumpable as i64,
                PR_SET_DUMPABLE if a[1] <= 1 => {
                    self.dumpable = a[1] as u32;
                    0
                }
                PR_SET_PDEATHSIG if a[1] <= 64 => {
                    new.pdeathsig = a[1] as i32;
                    0
                }
                PR_CAPBSET_DROP if !capable(CAP_SETPCAP) => eperm,
                PR_CAPBSET_DROP => {
                    new.cap_bounding &= !bit(a[1] as u32);
                    0
                }
                PR_SET_SECUREBITS => {
                    let o = old.securebits as u64;
                    if ((o & SECURE_ALL_LOCKS) >> 1) & (o ^ a[1]) != 0
                        || o & SECURE_ALL_LOCKS & !a[1] != 0
                        || a[1] & !(SECURE_ALL_LOCKS | SECURE_ALL_BITS) != 0
                        || !capable(CAP_SETPCAP)
                    {
                        eperm
                    } else {
                        new.securebits = a[1] as u32;
                        0
                    }
                }
                PR_SET_NO_NEW_PRIVS => {
                    new.no_new_privs = true;
                    0
                }
                PR_CAP_AMBIENT if a[1] == PR_CAP_AMBIENT_CLEAR_ALL => {
                    new.cap_ambient = 0;
                    0
                }
                PR_CAP_AMBIENT if a[1] == PR_CAP_AMBIENT_RAISE => {
                    let c = bit(a[2] as u32);
                    if old.cap_permitted & old.cap_inheritable & c == 0 || old.securebits as u64 & SECBIT_NO_CAP_AMBIENT_RAISE != 0 {
                        eperm
                    } else {
                        new.cap_ambient |= c;
                        0
                    }
                }
                _ => einval,
            },
            libc::SYS_setgroups if !capable(CAP_SETGID) => eperm,
            libc::SYS_setgroups => {
                let bytes = self.mem.get(a[1], a[0] as usize * 4);
                new.groups = bytes.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
                new.groups.sort_unstable();
                0
            }
            libc::SYS_setresgid | libc::SYS_setresuid => {
                let uid = nr == libc::SYS_setresuid;
                let (ids, cap) = if uid { (old.uids, CAP_SETUID) } else { (old.gids, CAP_SETGID) };
                let want = [a[0] as u32, a[1] as u32, a[2] as u32];
                if !capable(cap) && !want.iter().all(|w| ids[..3].contains(w)) {
                    eperm
                } else {
                    let set = [want[0], want[1], want[2], want[1]];
                    if uid {
                        new.uids = set;
                        if old.securebits as u64 & SECBIT_NO_SETUID_FIXUP == 0 {
                            // cap_emulate_setxuid
                            if ids[..3].contains(&0) && !set[..3].contains(&0) {
                                if old.securebits as u64 & SECBIT_KEEP_CAPS == 0 {
                                    new.cap_permitted = 0;
                                    new.cap_effective = 0;
                                }
                                new.cap_ambient = 0;
                            }
                            if ids[1] == 0 && set[1] != 0 {
                                new.cap_effective = 0;
                            }
                        }
                    } else {
                        new.gids = set;
                    }
                    0
                }
            }
            libc::SYS_setfsgid | libc::SYS_setfsuid => {
                let uid = nr == libc::SYS_setfsuid;
                let (ids, cap) = if uid { (old.uids, CAP_SETUID) } else { (old.gids, CAP_SETGID) };
                let want = a[0] as u32;
                if want != u32::MAX && (capable(cap) || ids.contains(&want)) {
                    if uid {
                        new.uids[3] = want;
                        if old.securebits as u64 & SECBIT_NO_SETUID_FIXUP == 0 && ids[3] == 0 && want != 0 {
                            new.cap_effective &= !CAP_FS_MASK;
                        }
                    } else {
                        new.gids[3] = want;
                    }
                }
                ids[3] as i64
            }
            libc::SYS_capset => {
                let d: Vec<u32> = self.mem.get(a[1], 24).chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
                let (eff, prm, inh) = (d[0] as u64 | (d[3] as u64) << 32, d[1] as u64 | (d[4] as u64) << 32, d[2] as u64 | (d[5] as u64) << 32);
                if (!capable(CAP_SETPCAP) && inh & !(old.cap_inheritable | old.cap_permitted) != 0)
                    || inh & !(old.cap_inheritable | old.cap_bounding) != 0
                    || prm & !old.cap_permitted != 0
                    || eff & !prm != 0
                {
                    eperm
                } else {
                    (new.cap_effective, new.cap_permitted, new.cap_inheritable) = (eff, prm, inh);
                    new.cap_ambient &= prm & inh;
                    0
                }
            }
            libc::SYS_openat => {
                self.open_loginuid = Some(tid);
                3
            }
            libc::SYS_write if self.open_loginuid == Some(tid) => {
                let text = String::from_utf8(self.mem.get(a[1], a[2] as usize)).unwrap();
                if old.loginuid != LOGINUID_UNSET && !capable(CAP_AUDIT_CONTROL) {
                    eperm
                } else {
                    new.loginuid = text.parse().unwrap();
                    a[2] as i64
                }
            }
            libc::SYS_close => {
                self.open_loginuid = None;
                0
            }
            _ => -(libc::ENOSYS as i64),
        };
        let fs_or_effective_changed = new.uids[1] != old.uids[1] || new.uids[3] != old.uids[3] || new.gids[1] != old.gids[1] || new.gids[3] != old.gids[3];
        self.tasks.get_mut(&tid).unwrap().creds = new;
        if fs_or_effective_changed {
            self.ids_changed(tid);
        }
        ret
    }

    fn status(&self, tid: i32) -> String {
        let c = &self.tasks[&tid].creds;
        let ids = |v: [u32; 4]| v.map(|i| i.to_string()).join("\t");
        let groups: Vec<String> = c.groups.iter().map(|g| g.to_string()).collect();
        format!(
            "Name:\tmock\nUid:\t{}\nGid:\t{}\nGroups:\t{} \nNoNewPrivs:\t{}\nCapInh:\t{:016x}\nCapPrm:\t{:016x}\nCapEff:\t{:016x}\nCapBnd:\t{:016x}\nCapAmb:\t{:016x}\n",
            ids(c.uids),
            ids(c.gids),
            groups.join(" "),
            c.no_new_privs as u8,
            c.cap_inheritable,
            c.cap_permitted,
            c.cap_effective,
            c.cap_bounding,
            c.cap_ambient
        )
    }
}

impl ProcessContext for Kernel {
    fn pid(&self) -> i32 {
        self.pid
    }
    fn tids(&self) -> RVec<i32> {
        self.tasks.keys().copied().collect()
    }
    fn read_memory(&mut self, addr: u64, mut buf: RSliceMut<'_, u8>) -> PResult<usize> {
        self.mem.read(addr, &mut buf)
    }
    fn write_memory(&mut self, addr: u64, data: RSlice<'_, u8>) -> PResult<usize> {
        self.mem.write(addr, &data)
    }
    fn scratch(&self) -> MemRange {
        MemRange { addr: BASE, len: SCRATCH as u64 }
    }
    fn inject_syscall(&mut self, tid: i32, nr: i64, args: SyscallArgs) -> PResult<i64> {
        if !self.tasks.contains_key(&tid) {
            return RResult::RErr(PluginError::new("mock", format!("no thread {tid}")));
        }
        RResult::ROk(self.syscall(tid, nr, args.0))
    }
    fn get_regset(&mut self, tid: i32, _regset: u32) -> PResult<RVec<u8>> {
        let mut regs = vec![0u8; REGS_SIZE];
        regs[FS_BASE * 8..FS_BASE * 8 + 8].copy_from_slice(&self.tasks[&tid].fs_base.to_le_bytes());
        RResult::ROk(regs.into())
    }
    fn proc_read(&mut self, name: RStr<'_>) -> PResult<RVec<u8>> {
        let name = name.as_str();
        let text = if name == "oom_score_adj" {
            format!("{}\n", self.oom_score_adj)
        } else if let Some(rest) = name.strip_prefix("task/") {
            let (tid, file) = rest.split_once('/').unwrap();
            let tid: i32 = tid.parse().unwrap();
            match file {
                "status" => self.status(tid),
                "loginuid" => self.tasks[&tid].creds.loginuid.to_string(),
                "attr/current" => match &self.tasks[&tid].creds.lsm_label {
                    Some(l) => format!("{l}\n"),
                    None => return RResult::RErr(PluginError::new("mock", "EINVAL")),
                },
                _ => return RResult::RErr(PluginError::new("mock", format!("no /proc/PID/{name}"))),
            }
        } else {
            return RResult::RErr(PluginError::new("mock", format!("no /proc/PID/{name}")));
        };
        RResult::ROk(text.into_bytes().into())
    }
}

fn records(image: &Image) -> Records {
    let payload = serde_json::to_vec(image).unwrap();
    Records(vec![Record { kind: "creds".into(), format: RecordFormat::Json, payload: payload.into() }], 0)
}

/// Another user's process: saved and fs ids of their own, groups, a reduced bounding
/// set with an inheritable capability outside it, an ambient capability, securebits
/// that forbid raising ambient ones, a login uid; its second thread has other uids
/// and no effective capabilities.
fn another_user(k: &Kernel) -> Image {
    let bnd = root(cap_last_cap().unwrap()).cap_bounding & !(bit(CAP_SYS_MODULE) | bit(CAP_SYS_ADMIN));
    let main = Creds {
        uids: [65534, 4012, 4013, 4014],
        gids: [65534, 4002, 4003, 4004],
        groups: vec![4242, 4343, 65534],
        cap_effective: bit(CAP_NET_BIND_SERVICE),
        cap_permitted: bit(CAP_NET_BIND_SERVICE) | bit(CAP_CHOWN),
        cap_inheritable: bit(CAP_NET_BIND_SERVICE) | bit(CAP_SYS_MODULE),
        cap_bounding: bnd,
        cap_ambient: bit(CAP_NET_BIND_SERVICE),
        securebits: (SECBIT_KEEP_CAPS | SECBIT_NO_CAP_AMBIENT_RAISE | 1) as u32,
        no_new_privs: true,
        pdeathsig: libc::SIGURG,
        loginuid: 4242,
        lsm_label: None,
    };
    let second = Creds { uids: [4013; 4], cap_effective: 0, ..main.clone() };
    let threads = k
        .tasks
        .iter()
        .zip([main, second])
        .map(|((&tid, t), creds)| Thread { tid, fs_base: t.fs_base, creds })
        .collect();
    Image { version: FORMAT_VERSION, dumpable: 1, oom_score_adj: 0, threads }
}

#[test]
fn a_root_restore_child_becomes_exactly_another_user_thread_by_thread() {
    let mut k = Kernel::new(&[100, 101]);
    let image = another_user(&k);
    run_restart(&mut Plugin::default(), &mut k, records(&image), 3).unwrap();
    for t in &image.threads {
        assert_eq!(k.tasks[&t.tid].creds, t.creds, "thread {}", t.tid);
    }
    // The uid changes made it undumpable; the plugin set it back after the last one.
    assert_eq!(k.dumpable, 1);
}

#[test]
fn a_root_process_restored_by_root_needs_no_call_that_changes_anything() {
    let mut k = Kernel::new(&[100]);
    let creds = k.tasks[&100].creds.clone();
    let image = Image { version: FORMAT_VERSION, dumpable: 1, oom_score_adj: 0, threads: vec![Thread { tid: 100, fs_base: 0x7000 + 100, creds: creds.clone() }] };
    run_restart(&mut Plugin::default(), &mut k, records(&image), 3).unwrap();
    assert_eq!(k.tasks[&100].creds, creds);
}

#[test]
fn what_the_kernel_will_not_set_fails_the_restore_naming_thread_and_field() {
    // A restore child with a login uid of its own, without CAP_AUDIT_CONTROL.
    let mut k = Kernel::new(&[100, 101]);
    for t in k.tasks.values_mut() {
        t.creds.loginuid = 1000;
        t.creds.cap_effective &= !bit(CAP_AUDIT_CONTROL);
        t.creds.cap_permitted &= !bit(CAP_AUDIT_CONTROL);
    }
    let image = another_user(&k);
    let err = run_restart(&mut Plugin::default(), &mut k, records(&image), 3).unwrap_err();
    assert!(err.contains("thread 100") && err.contains("login uid cannot be set to 4242"), "{err}");

    // A capability the restore child does not hold cannot be given.
    let mut k = Kernel::new(&[100, 101]);
    for t in k.tasks.values_mut() {
        t.creds.cap_permitted &= !bit(CAP_CHOWN);
        t.creds.cap_effective &= !bit(CAP_CHOWN);
    }
    let image = another_user(&k);
    let err = run_restart(&mut Plugin::default(), &mut k, records(&image), 3).unwrap_err();
    assert!(err.contains("thread 100") && err.contains("setting the capabilities"), "{err}");

    // Nor a bounding set larger than the restore child's.
    let mut k = Kernel::new(&[100]);
    k.tasks.get_mut(&100).unwrap().creds.cap_bounding &= !bit(CAP_CHOWN);
    let mut image = another_user(&k);
    image.threads[0].creds.cap_bounding |= bit(CAP_CHOWN);
    let err = run_restart(&mut Plugin::default(), &mut k, records(&image), 3).unwrap_err();
    assert!(err.contains("bounding capabilities"), "{err}");

    // Nor another LSM label (a confined process, restored by an unconfined ferry).
    let mut k = Kernel::new(&[100]);
    k.tasks.get_mut(&100).unwrap().creds.lsm_label = Some("unconfined".into());
    let mut image = another_user(&k);
    image.threads[0].creds.lsm_label = Some("/usr/bin/workload (enforce)".into());
    let err = run_restart(&mut Plugin::default(), &mut k, records(&image), 3).unwrap_err();
    assert!(err.contains("thread 100") && err.contains("LSM label"), "{err}");
}
