//! Builds the C workload program (`workloads/workload.c`) into an executable in
//! OUT_DIR and hands its path to the crate as `FERRY_WORKLOAD`.

use std::{env, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let src = manifest.join("workloads/workload.c");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("ferry-workload");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", manifest.join("workloads/traps.c").display());
    println!("cargo:rerun-if-changed={}", manifest.join("workloads/mapped.c").display());
    println!("cargo:rerun-if-changed={}", manifest.join("workloads/tty.c").display());
    println!("cargo:rerun-if-changed=build.rs");

    // cc only finds the compiler and its target flags: it builds libraries, and this
    // is an executable, so the compiler is run directly.
    let compiler = cc::Build::new().cargo_metadata(false).get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args(["-O1", "-g", "-pthread", "-Wall", "-Werror", "-o"]).arg(&out).arg(&src);
    let status = cmd.status().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(status.success(), "building the workload failed: {cmd:?}");
    println!("cargo:rustc-env=FERRY_WORKLOAD={}", out.display());
}
