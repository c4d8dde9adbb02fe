"""A seccomp-BPF filter for the code sandbox, assembled by hand (x86_64 Linux only).

bubblewrap loads it (`bwrap --seccomp FD`) right before it starts the child interpreter, so it
binds every thread of the child and cannot be lifted. It refuses process creation (threads stay
allowed), sockets, tracing, mounts, namespaces, io_uring, kernel keyrings and module loading.
The refused calls fail with EPERM, so Python raises an ordinary error the sandbox reports.

execve stays allowed: bwrap installs the filter before it execs the interpreter, and a filter
cannot count. A program that execs anyway (past the audit hook) only replaces itself with another
binary under the same namespaces and filter, and loses the guard thread, so it cannot pass.
"""
from __future__ import annotations

import errno
import platform
import struct

# struct sock_filter opcodes and seccomp return values (linux/filter.h, linux/seccomp.h).
_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET = 0x06  # BPF_RET | BPF_K
_KILL_PROCESS = 0x80000000
_ERRNO = 0x00050000
_ALLOW = 0x7FFF0000
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
_CLONE_THREAD = 0x00010000
# Offsets into struct seccomp_data.
_NR, _ARCH, _ARG0_LOW = 0, 4, 16

_CLONE, _CLONE3 = 56, 435
# x86_64 syscall numbers that fail with EPERM inside the sandbox.
DENIED = {
    "fork": 57, "vfork": 58, "execveat": 322,
    "socket": 41, "socketpair": 53,
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272,
    "setns": 308, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "mount_setattr": 442, "bpf": 321, "userfaultfd": 323,
    "perf_event_open": 298, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "keyctl": 250, "add_key": 248, "request_key": 249,
    "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "pidfd_open": 434, "pidfd_getfd": 438, "personality": 135,
    "mknod": 133, "mknodat": 259, "open_by_handle_at": 304, "name_to_handle_at": 303,
    "quotactl": 179, "swapon": 167, "swapoff": 168, "reboot": 169, "syslog": 103,
    "acct": 163, "settimeofday": 164, "clock_settime": 227, "adjtimex": 159,
    "clock_adjtime": 305, "iopl": 172, "ioperm": 173, "modify_ldt": 154, "uselib": 134,
    "vhangup": 153,
}


def supported() -> bool:
    """Only the x86_64 syscall table is written out; elsewhere the sandbox runs without it."""
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def build_filter() -> bytes:
    """The raw `struct sock_filter` array bubblewrap reads from its --seccomp descriptor."""
    prog = [
        _op(_LD_ABS, _ARCH), _op(_JEQ, _AUDIT_ARCH_X86_64, jt=1), _op(_RET, _KILL_PROCESS),
        # x32 syscalls reach the same kernel entry points under other numbers: refuse them all.
        _op(_LD_ABS, _NR), _op(_JGE, _X32_BIT, jf=1), _op(_RET, _KILL_PROCESS),
    ]
    for nr in sorted(set(DENIED.values())):
        prog += [_op(_JEQ, nr, jf=1), _op(_RET, _ERRNO | errno.EPERM)]
    # clone3 passes its flags in memory, out of the filter's sight: ENOSYS makes glibc fall back
    # to clone, whose flags it can see. clone is fine for a thread, refused for a new process.
    prog += [_op(_JEQ, _CLONE3, jf=1), _op(_RET, _ERRNO | errno.ENOSYS)]
    prog += [_op(_JEQ, _CLONE, jf=4), _op(_LD_ABS, _ARG0_LOW), _op(_JSET, _CLONE_THREAD, jf=1),
             _op(_RET, _ALLOW), _op(_RET, _ERRNO | errno.EPERM)]
    prog.append(_op(_RET, _ALLOW))
    return b"".join(prog)
