"""Run untrusted Python (model-written code plus a task's tests) in a separate, limited process.

Each run gets a fresh interpreter (`python -I -B -u`: isolated, no .pyc writes, unbuffered) in
its own session and temp dir, with
  - resource limits: address space (RLIMIT_AS), CPU seconds, file size, open files, processes;
  - an audit hook (PEP 578) that refuses sockets, subprocess/exec/spawn/fork/system, signals to
    other processes, ctypes, and any write, delete, rename or chmod outside the temp dir;
  - a wall-clock limit enforced by the parent (the whole process group is killed).
A crash, infinite loop or allocation storm only takes the child down. Audit hooks are defence in
depth, not a security boundary (CPython says so); they stop model code from doing damage by
accident, which is the threat here. RLIMIT_NPROC does not bind root, so under root the hook is what
blocks process creation.

The child reports through a private pipe and must echo a nonce it read from stdin, so code that
calls `os._exit(0)` before the tests run, or prints a fake result, cannot pass.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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


# Runs inside the child. It reads its settings (and the nonce) from stdin, sets the limits,
# installs the hook, then execs program.py from its cwd. Kept as plain source so the child
# imports nothing of moco_ray (fast start, nothing to tamper with).
_BOOT = r'''
import sys, os, json, resource, traceback, builtins
cfg = json.loads(sys.stdin.readline()); sys.stdin.close()
nonce, res_fd = cfg["nonce"], cfg["fd"]
for lim, val in ((resource.RLIMIT_AS, cfg["mem"]), (resource.RLIMIT_CPU, cfg["cpu"]),
                 (resource.RLIMIT_FSIZE, cfg["fsize"]), (resource.RLIMIT_NOFILE, cfg["nofile"]),
                 (resource.RLIMIT_NPROC, 1), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(lim, (val, val))
home = os.path.realpath(os.getcwd())
src = open("program.py").read()
violations = []
class SandboxViolation(PermissionError):
    pass
class SandboxImportError(ImportError):
    pass
DENY = {"os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill",
        "resource.setrlimit", "resource.prlimit", "os.chmod", "os.chown", "os.chflags",
        "os.setxattr", "os.removexattr", "shutil.chown", "pty.spawn"}
DENY_PREFIX = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "ctypes.",
               "_winapi.", "http.client.", "ftplib.", "smtplib.", "urllib.", "webbrowser.")
NO_IMPORT = {"ctypes", "_ctypes", "cffi", "_posixsubprocess"}
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
    elif event == "import" and args[0].partition(".")[0] in NO_IMPORT:
        raise SandboxImportError("sandbox: module " + args[0] + " is not available")
    elif event == "open" and args[2] & WRITE and not inside(args[0]):
        deny("writing " + str(args[0]))
    elif event in PATH_EVENTS:
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
        bad = [p for p in paths if not inside(p)]
        if bad:
            deny(event + " on " + str(bad[0]))
# subprocess calls _posixsubprocess.fork_exec after its audit event; code that calls fork_exec
# directly would skip the event, so the module is loaded now with fork_exec replaced, and a
# fresh re-import is refused by the hook.
import _posixsubprocess
def _no_fork_exec(*a, **k):
    deny("_posixsubprocess.fork_exec")
_posixsubprocess.fork_exec = _no_fork_exec
sys.addaudithook(hook)
status, msg = "ok", ""
try:
    exec(compile(src, "program.py", "exec"), {"__name__": "__sandbox__", "__builtins__": builtins})
except MemoryError:
    status, msg = "memory", "MemoryError"
except SandboxViolation as e:
    status, msg = "forbidden", str(e)
except BaseException as e:
    # Skip this bootstrap's own frame; the program's frames and the error remain.
    tb = traceback.format_exception(type(e), e, e.__traceback__.tb_next)
    status, msg = "exception", "".join(tb)[-2000:]
if violations:
    status, msg = "forbidden", "sandbox: " + "; ".join(violations[:3]) + " is not allowed"
os.write(res_fd, json.dumps({"nonce": nonce, "status": status, "message": msg}).encode())
os._exit(0)
'''


def _child_env(workdir: str) -> dict[str, str]:
    # A minimal environment: no inherited secrets, one BLAS thread (RLIMIT_AS counts thread stacks).
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _tail(path: Path, n: int = 2000) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - n))
        return f.read().decode("utf-8", "replace")


def run_python(program: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `program` in a fresh, limited interpreter; passed = it ran to the end without error."""
    lim = limits or SandboxLimits()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="moco_sandbox_") as workdir:
        wd = Path(workdir)
        (wd / "program.py").write_text(program)
        rfd, wfd = os.pipe()
        cfg = {"nonce": secrets.token_hex(16), "fd": wfd, "mem": lim.memory_mb << 20,
               "cpu": int(lim.timeout_s) + 1, "fsize": lim.file_mb << 20,
               "nofile": lim.max_open_files}
        try:
            with open(wd / "out.txt", "wb") as out:
                try:
                    proc = subprocess.Popen(
                        [sys.executable, "-I", "-B", "-u", "-c", _BOOT], cwd=workdir,
                        env=_child_env(workdir), stdin=subprocess.PIPE, stdout=out,
                        stderr=subprocess.STDOUT, pass_fds=(wfd,), start_new_session=True,
                        bufsize=0)  # unbuffered stdin: closing it never flushes into a dead pipe
                finally:
                    os.close(wfd)  # the child holds its copy; EOF on rfd once it is gone
                rc = _feed_and_wait(proc, json.dumps(cfg) + "\n", lim.timeout_s)
            report = _read_report(rfd)
        finally:
            os.close(rfd)
        output = _tail(wd / "out.txt")
    return _classify(rc, report, cfg["nonce"], output, lim, time.monotonic() - t0)


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
        # The child leads its own session, so this also takes anything that got past the hook.
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _read_report(rfd: int) -> dict | None:
    os.set_blocking(rfd, False)
    chunks = []
    try:
        while chunk := os.read(rfd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass  # nothing more buffered (a stray writer still holds the pipe); use what came
    try:
        report = json.loads(b"".join(chunks))
    except ValueError:
        return None  # no report (killed) or garbage written to the fd by the program
    return report if isinstance(report, dict) else None


def _classify(rc: int | None, report: dict | None, nonce: str, output: str,
              lim: SandboxLimits, seconds: float) -> SandboxResult:
    def result(passed: bool, error: ErrorKind | None, message: str) -> SandboxResult:
        return SandboxResult(passed=passed, error=error, message=message, output=output,
                             seconds=round(seconds, 4))

    if rc is None or (rc in (-signal.SIGXCPU, -signal.SIGKILL) and report is None):
        return result(False, "timeout", f"exceeded {lim.timeout_s:g} s")
    if report is None or report.get("nonce") != nonce:
        if rc < 0:
            return result(False, "crash", f"killed by signal {signal.Signals(-rc).name}")
        if "MemoryError" in output:
            return result(False, "memory", "MemoryError")
        return result(False, "exception", f"exited with code {rc} before the end of the program")
    status = report["status"]
    if status == "ok":
        return result(True, None, "")
    return result(False, status, report["message"])


def run_many(programs: list[str], limits: SandboxLimits | None = None,
             workers: int | None = None) -> list[SandboxResult]:
    """Run several programs at once (each in its own process); results in input order."""
    workers = workers or max(1, min(len(programs), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_python(p, limits), programs))
