//! The scratch area's recovery through `rt_sigreturn`: a thread let go in the middle of
//! an injected call (ferry died) gets its registers, its FPU state and its signal mask
//! back in one system call, as from a signal handler. A signal pending meanwhile (a
//! single-step trap taken at the freeze, say) is then delivered on the way out of that
//! call with the thread's own registers as its context, never ferry's code: with the
//! mask put back by its own call before the registers (the `iretq` recovery of
//! [`super::inject`]), a handler could see ferry's code as where the thread was.
//!
//! The frame ([`frame`]) is written before each call; the FPU state is saved into it by
//! the recovery code itself (`xsave`, into the layout the kernel gives its own signal
//! frames: [`fixed`] writes its software bytes and end marker once, as the kernel
//! would for the thread's features and size, read from its xstate regset). The alternate
//! signal stack is left alone: the frame's `uc_stack` has a mode `sigaltstack`
//! refuses, which `rt_sigreturn` ignores. In Intel syntax, the block at `data`:
//!
//! ```text
//!  0: syscall                         the injected call (every signal blocked)
//!  2: mov eax, [rip + data]           the features to save
//!     mov edx, [rip + data + 4]
//!     xsave64 [rip + data + 512]      the FPU state, into the frame's fpstate
//!     lea rsp, [rip + data + 16]      just past the frame's return address
//!     mov eax, 15                     rt_sigreturn
//!     syscall
//!     ud2                             (never reached)
//! ```

use super::*;

const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// In the block: the features to save (`xsave`'s edx:eax).
const XFEATURES_AT: u64 = 0;
/// The `struct rt_sigframe`, from its return address (rsp is 8 past it).
pub(super) const FRAME_AT: u64 = 8;
/// The FPU state (64-byte aligned, as `xsave` needs).
const FPSTATE_AT: u64 = 512;
/// UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS: the frame's ss is the thread's.
const UC_FLAGS: u64 = 0x7;
/// A `uc_stack.ss_flags` that is no mode (neither 0, SS_ONSTACK nor SS_DISABLE).
const SS_NO_MODE: u64 = 3;
/// XFEATURE_MASK_XTILE_DATA: enabled per process, so the kernel's size for the frame
/// is the process's, not the one its xstate regset gives.
const DYNAMIC_FEATURES: u64 = 1 << 18;

/// The kernel's FPU signal-frame layout: which features, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Layout {
    xfeatures: u64,
    size: u32,
}

/// The layout for the FPU state an `NT_X86_XSTATE` regset shows: its features (XCR0,
/// which ptrace puts at byte 464) and its size (the regset's, the kernel's largest). None
/// where it would not fit the recovery page or the process's own size may be smaller
/// (features enabled per process): then the `iretq` recovery serves.
pub(super) fn layout(xstate: &[u8]) -> Option<Layout> {
    let xfeatures = u64::from_le_bytes(xstate.get(464..472)?.try_into().expect("8 bytes"));
    let size = u32::try_from(xstate.len()).ok()?;
    let fits = FPSTATE_AT + u64::from(size) + 4 <= PAGE;
    (size >= 576 && xfeatures & 0x3 == 0x3 && xfeatures & DYNAMIC_FEATURES == 0 && fits).then_some(Layout { xfeatures, size })
}

/// The recovery code for a block `data` bytes after the site (see the module's doc).
pub(super) fn code(data: u64) -> Vec<u8> {
    // Each instruction: its bytes, then (if any) the 32-bit displacement to `data + field`.
    const PROGRAM: &[(&[u8], Option<u64>)] = &[
        (&[0x0f, 0x05], None),
        (&[0x8b, 0x05], Some(XFEATURES_AT)),
        (&[0x8b, 0x15], Some(XFEATURES_AT + 4)),
        (&[0x48, 0x0f, 0xae, 0x25], Some(FPSTATE_AT)),
        (&[0x48, 0x8d, 0x25], Some(FRAME_AT + 8)),
        (&[0xb8, 0x0f, 0x00, 0x00, 0x00], None),
        (&[0x0f, 0x05], None),
        (&[0x0f, 0x0b], None),
    ];
    let mut out = Vec::with_capacity(48);
    for &(bytes, field) in PROGRAM {
        out.extend_from_slice(bytes);
        if let Some(field) = field {
            let next = out.len() as u64 + 4;
            out.extend_from_slice(&((data + field).wrapping_sub(next) as u32).to_le_bytes());
        }
    }
    out
}

/// What the block holds for every call, as (offset, bytes): the features to save, the
/// FPU state's software bytes, the reserved part of its header (zero, which `xsave`
/// leaves as it is) and its end marker. None of it is what `xsave` writes, so writing
/// it again never disturbs a recovery under way.
pub(super) fn fixed(l: &Layout) -> Vec<(u64, Vec<u8>)> {
    let mut sw = Vec::with_capacity(48);
    sw.extend_from_slice(&FP_XSTATE_MAGIC1.to_le_bytes());
    sw.extend_from_slice(&(l.size + 4).to_le_bytes());
    sw.extend_from_slice(&l.xfeatures.to_le_bytes());
    sw.extend_from_slice(&l.size.to_le_bytes());
    sw.resize(48, 0);
    vec![
        (XFEATURES_AT, l.xfeatures.to_le_bytes().to_vec()),
        (FPSTATE_AT + 464, sw),
        (FPSTATE_AT + 520, vec![0; 56]),
        (FPSTATE_AT + u64::from(l.size), FP_XSTATE_MAGIC2.to_le_bytes().to_vec()),
    ]
}

/// The `struct rt_sigframe` (up to its `uc_sigmask`) that gives the thread registers
/// `r` (already [`resumed`]) and signal mask `mask`, its FPU state from the block at
/// `block`; written at `block + FRAME_AT`.
pub(super) fn frame(r: &user_regs_struct, mask: u64, block: u64) -> Vec<u8> {
    let words = [
        // Return address; uc_flags, uc_link; uc_stack (ss_sp, ss_flags, ss_size).
        0, UC_FLAGS, 0, 0, SS_NO_MODE, 0,
        // struct sigcontext.
        r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx, r.rdx, r.rax, r.rcx, r.rsp, r.rip,
        r.eflags,
        (r.cs & 0xffff) | (r.ss & 0xffff) << 48, // cs, gs, fs, ss
        0, 0, 0, 0, // err, trapno, oldmask, cr2
        block + FPSTATE_AT,
        0, 0, 0, 0, 0, 0, 0, 0,
        // uc_sigmask.
        mask,
    ];
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_is_what_the_assembler_makes_of_it() {
        // `as` (GNU binutils) of the listing in the module's doc, its block 0xff000 on.
        const ASSEMBLED: [u8; 38] = [
            0x0f, 0x05, 0x8b, 0x05, 0xf8, 0xef, 0x0f, 0x00, 0x8b, 0x15, 0xf6, 0xef, 0x0f, 0x00, 0x48, 0x0f, 0xae, 0x25,
            0xea, 0xf1, 0x0f, 0x00, 0x48, 0x8d, 0x25, 0xf3, 0xef, 0x0f, 0x00, 0xb8, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05,
            0x0f, 0x0b,
        ];
        assert_eq!(code(0xff000), ASSEMBLED);
    }

    #[test]
    fn the_frame_is_the_kernels_rt_sigframe() {
        let mut r: user_regs_struct = unsafe { std::mem::zeroed() };
        (r.r8, r.rip, r.eflags, r.cs, r.ss) = (8, 0x401000, 0x346, 0x33, 0x2b);
        let f = frame(&r, 0x5a, 0x7000_0000);
        let word = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().unwrap());
        // 8 (return address) + uc_flags, uc_link, uc_stack (24) + sigcontext (256) + mask.
        assert_eq!(f.len(), 8 + 16 + 24 + 256 + 8);
        assert_eq!(word(8), UC_FLAGS);
        assert_eq!(word(32), SS_NO_MODE);
        let sc = 48;
        assert_eq!((word(sc), word(sc + 16 * 8), word(sc + 17 * 8)), (8, 0x401000, 0x346));
        assert_eq!(word(sc + 18 * 8), 0x33 | 0x2b << 48);
        assert_eq!(word(sc + 23 * 8), 0x7000_0000 + FPSTATE_AT);
        assert_eq!(word(sc + 256), 0x5a);
    }

    #[test]
    fn a_layout_is_taken_from_the_regset_only_where_it_fits() {
        // As ptrace gives it on an AVX-512 machine: XCR0 at byte 464.
        let mut x = vec![0u8; 2432];
        x[464..472].copy_from_slice(&0xe7u64.to_le_bytes());
        assert_eq!(layout(&x), Some(Layout { xfeatures: 0xe7, size: 2432 }));
        let mut amx = x.clone();
        amx[464..472].copy_from_slice(&(0xe7u64 | 3 << 17).to_le_bytes());
        assert_eq!(layout(&amx), None);
        assert_eq!(layout(&[x.clone(), vec![0; 11008 - 2432]].concat()), None);
        assert_eq!(layout(&x[..400]), None);
        x[464] = 0;
        assert_eq!(layout(&x), None);
    }
}
