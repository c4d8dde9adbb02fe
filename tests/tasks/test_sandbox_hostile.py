"""Hostile programs against the sandbox: every one must fail closed (passed=False, no damage).

Most attacks that forge a pass end in `assert False`: they pass only if the forgery worked. The
ones that attack the machine first disable the audit hook the way issue 15 describes (emptying
its tables in the bootstrap's globals), so what stops them is the OS layer underneath.
All programs run at once through run_many to keep the suite fast.
"""
from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path

import pytest

from moco_ray.tasks.sandbox import SandboxLimits, isolation_layers, run_many, run_python

LIMITS = SandboxLimits(timeout_s=8, memory_mb=256, file_mb=4)
STDLIB = Path(sysconfig.get_path("stdlib"))
NAMESPACES = "namespaces" in isolation_layers()

# Issue 15 (b): reach the bootstrap's module globals and switch the descriptive hook off.
TAMPER = """import sys, os
_m = sys.modules['__main__']
_m.DENY.clear(); _m.DENY_PREFIX = ('no such event',); _m.PATH_EVENTS.clear()
_m.inside = lambda p: True
_m.deny = lambda what: None
_m.violations.clear()
"""

SPRAY = """
def spray(payloads):
    for fd in range(3, 1024):  # every inherited descriptor, wherever the parent's pipes landed
        for p in payloads:
            try:
                os.write(fd, p)
            except OSError:
                pass
"""

FORGE = {
    # Issue 15 (a): the bootstrap's state, then a report that says ok, then exit.
    "forge_bootstrap_globals": TAMPER + SPRAY + """
import json
g = vars(_m)
blobs = [v for v in g.values() if isinstance(v, (bytes, str))]
spray([b'ok', json.dumps({'status': 'ok', 'message': ''}).encode()]
      + [b.encode() if isinstance(b, str) else b for b in blobs])
os._exit(0)
assert False
""",
    "forge_frame_locals": "import sys, os\n" + SPRAY + """
found = []
f = sys._getframe()
while f is not None:
    found += [v for v in list(f.f_locals.values()) + list(f.f_globals.values())
              if isinstance(v, bytes)]
    f = f.f_back
spray(found)
os._exit(0)
assert False
""",
    "forge_gc_walk": "import os, gc\n" + SPRAY + """
try:
    spray([o for o in gc.get_objects() if isinstance(o, bytes) and len(o) == 32])
except PermissionError:
    pass
try:
    spray([o for o in gc.get_referrers(os.write) if isinstance(o, bytes)])
except PermissionError:
    pass
os._exit(0)
assert False
""",
    "forge_other_threads_frames": "import os, sys\n" + SPRAY + """
try:
    for frame in sys._current_frames().values():
        spray([v for v in frame.f_locals.values() if isinstance(v, bytes)])
except PermissionError:
    pass
os._exit(0)
assert False
""",
    "forge_settrace_jump": """import sys
def tracer(frame, event, arg):
    if event == 'line' and frame.f_code.co_name == '<module>' and frame.f_lineno == 9:
        frame.f_lineno = 10
    return tracer
try:
    sys.settrace(tracer)
except PermissionError:
    pass
assert False
x = 1
""",
    "forge_profile_jump": """import sys
run = sys._getframe(1)
def prof(frame, event, arg):
    try:
        run.f_trace = prof
        run.f_lineno = run.f_lineno + 8
    except ValueError:
        sys.setprofile(None)
sys.setprofile(prof)
len('x')
assert False
""",
    "forge_trace_new_threads": """import threading
def tracer(*args):
    return tracer
threading.settrace(tracer)
try:
    threading.Thread(target=print).start()
except PermissionError:
    pass
assert False
""",
    "forge_replace_core_hook_code": TAMPER + """
try:
    _m._core_hook.__code__ = (lambda event, args: None).__code__
except PermissionError:
    pass
frames = sys._current_frames()
assert False
""",
    "forge_second_audit_hook": "import sys, os\n" + SPRAY + """
try:
    sys.addaudithook(lambda event, args: spray([b'ok']))
except PermissionError:
    pass
import time
time.sleep(0.2)
assert False
""",
    # Finalizers run on whichever thread triggers a collection: if one ever ran on the guard
    # thread it would find the token in the guard's frame.
    "forge_finalizers_on_the_guard": "import gc, os, sys, time, _thread\n" + SPRAY + """
MAIN = _thread.get_ident()
class Evil:
    def __del__(self):
        if _thread.get_ident() == MAIN:
            return
        found, f = [], sys._getframe()
        while f is not None:
            found += [v for v in f.f_locals.values() if isinstance(v, bytes)]
            f = f.f_back
        spray(found)
        os._exit(0)
gc.set_threshold(1)
for _ in range(3000):
    a = Evil()
    a.me = a
del a
time.sleep(0.3)
assert False
""",
    "forge_release_the_final_wait": """import sys, os, time
run = sys._getframe(1)
loc = run.f_locals
loc['block'].release()
os.write(loc['done_w'], b'.' * 50)
time.sleep(0.3)
assert False
""",
    "forge_call_the_guard": TAMPER + """
import threading, stat, time
lock = threading.Lock(); lock.acquire(); box = []
def parked():
    box.append(sys._getframe())
    lock.acquire()
threading.Thread(target=parked, daemon=True).start()
time.sleep(0.1)
frame = box[0]
for fd in range(3, 64):
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            continue
    except OSError:
        continue
    r, w = os.pipe(); r2, w2 = os.pipe()
    os.write(w, b'.')
    threading.Thread(target=_m._guard, args=(frame, frame.f_lasti, b'\\0' * 32, fd, r, w2,
                     os.read, os.write, os.sched_yield, os._exit), daemon=True).start()
time.sleep(0.3)
assert False
""",
    "forge_proc_self_mem": """import os
with open('/proc/self/mem', 'rb') as mem:
    mem.read(1)
os._exit(0)
""",
    "forge_crafted_code_object": """
code = (lambda: 0).__code__
try:
    bad = code.replace(co_code=bytes(len(code.co_code)))
except PermissionError:
    pass
import marshal
assert False
""",
    "forge_exit_zero_from_a_thread": """import os, threading, time
threading.Thread(target=os._exit, args=(0,)).start()
time.sleep(1)
assert False
""",
    "forge_lies_on_stdout": """import json, sys
print(json.dumps({'status': 'ok', 'passed': True}))
sys.stdout.flush()
raise SystemExit(0)
""",
}

HOOK_AND_FD = {
    "tamper_then_socket": TAMPER + """
import socket
socket.create_connection(('1.1.1.1', 80), timeout=2)
""",
    "tamper_then_fork": TAMPER + "os.fork()\n",
    "tamper_then_posix_spawn": TAMPER + "os.posix_spawn('/bin/true', ['true'], {})\n",
    "tamper_then_exec": TAMPER + "os.execv('/bin/sh', ['sh', '-c', 'exit 0'])\n",
    # Fd games, then a failing test: whatever the descriptors do, a failing program must fail
    # (a program that only plays fd games and then passes its tests may pass).
    "fd_junk_then_fail": "import os\n" + SPRAY + "spray([b'\\0' * 64])\nassert False\n",
    "fd_close_all_then_fail": "import os\nos.closerange(3, 1024)\nassert False\n",
    "fd_redirect_to_stdout_then_fail": """import os
for fd in range(3, 1024):
    try:
        os.dup2(1, fd)
    except OSError:
        pass
assert False
""",
    "fork_bomb_past_the_hook": TAMPER + "while True:\n    os.fork()\n",
    "thread_bomb": """import threading, time
while True:
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
""",
    "gigabytes_of_output": "import sys\nwhile True:\n    sys.stdout.write('x' * 10 ** 6)\n",
    "gigabytes_into_a_file": "f = open('big', 'wb')\nwhile True:\n    f.write(bytes(2 ** 20))\n",
    "ctypes_by_import_module": "import importlib\nimportlib.import_module('_ctypes')\n",
    "ctypes_by_file_location": f"""import importlib.util, glob
path = glob.glob({str(STDLIB / 'lib-dynload' / '_ctypes.*')!r})[0]
spec = importlib.util.spec_from_file_location('_ctypes', path)
importlib.util.module_from_spec(spec)
""",
    "ctypes_by_create_dynamic": TAMPER + f"""
import _imp, glob, importlib.machinery as m
path = glob.glob({str(STDLIB / 'lib-dynload' / '_ctypes.*')!r})[0]
_imp.create_dynamic(m.ModuleSpec('_ctypes', None, origin=path))
""",
    # A dotted name hides the module from a check on the first part; the init function is
    # found by the last one. And another Python's copy under /usr loads just as well.
    "ctypes_under_a_dotted_name": """import importlib.util as u, glob, sys
paths = glob.glob('/usr/lib/python3*/lib-dynload/_ctypes.*') + glob.glob(
    sys.base_prefix + '/lib/python3*/lib-dynload/_ctypes.*')
for path in paths:
    try:
        u.module_from_spec(u.spec_from_file_location('pkg._ctypes', path))
    except ImportError:
        continue
    print('LOADED', path)
    break
else:
    raise ImportError('no _ctypes could be loaded')
""",
    # Passes only if some copy of _ctypes can still be read as a shared library.
    "ctypes_file_is_out_of_reach": """import glob, sys
paths = glob.glob('/usr/lib/python3*/lib-dynload/_ctypes.*') + glob.glob(
    sys.base_prefix + '/lib/python3*/lib-dynload/_ctypes.*')
readable = []
for path in paths:
    try:
        with open(path, 'rb') as f:
            if f.read(4) == b'\\x7fELF':
                readable.append(path)
    except OSError:
        pass
assert readable, 'no copy of _ctypes is readable'
""",
    "native_code_through_sqlite": """import sqlite3, glob
conn = sqlite3.connect(':memory:')
conn.enable_load_extension(True)
conn.load_extension(glob.glob('/usr/lib/x86_64-linux-gnu/libz.so*')[0])
""",
    "testcapi_by_loader": f"""import glob, importlib.machinery as m, importlib.util as u
path = glob.glob({str(STDLIB / 'lib-dynload' / '_testcapi.*')!r})[0]
loader = m.ExtensionFileLoader('_testcapi', path)
loader.create_module(u.spec_from_loader('_testcapi', loader))
""",
    "site_packages_by_path": TAMPER + """
import glob
sys.path += glob.glob('/work/*/.venv/lib/python3*/site-packages') + ['/usr/lib/python3/dist-packages']
import cffi
""",
}


def _targets(root: Path) -> dict[str, Path]:
    data = root / "dataset"
    data.mkdir()
    (data / "tasks.json").write_text("{}")
    return {"outside": root / "outside.txt", "dataset": data / "tasks.json",
            "run": root / "runs" / "r1", "stdlib": STDLIB / "sandbox_pwned.py"}


def _damage_programs(t: dict[str, Path], victim: int) -> dict[str, str]:
    outside, dataset, run, stdlib = (str(t[k]) for k in ("outside", "dataset", "run", "stdlib"))
    return {
        "tamper_then_write_outside": TAMPER + f"open({outside!r}, 'w').write('pwned')\n",
        "tamper_then_write_stdlib": TAMPER + f"open({stdlib!r}, 'w').write('pwned')\n",
        "tamper_then_overwrite_dataset": TAMPER + f"open({dataset!r}, 'w').write('pwned')\n",
        "tamper_then_create_run_dir": TAMPER + f"os.makedirs({run!r})\n",
        "tamper_then_rmtree_stdlib_package": TAMPER
        + f"import shutil\nshutil.rmtree({str(STDLIB / 'json')!r})\n",
        "symlink_to_outside": TAMPER + f"os.symlink({outside!r}, 'l')\nopen('l', 'w').write('x')\n",
        "symlink_to_stdlib": TAMPER
        + f"os.symlink({str(STDLIB / 'os.py')!r}, 'l')\nopen('l', 'a').write('x')\n",
        "hardlink_of_stdlib": TAMPER + f"os.link({str(STDLIB / 'os.py')!r}, 'h')\n",
        "read_parent_environ": f"print(open('/proc/{os.getpid()}/environ').read())\n",
        "read_parent_cmdline": "print(open('/proc/1/cmdline').read())\n",
        "signal_a_process_outside": f"import os\nos.kill({victim}, 9)\n",
        "signal_past_the_hook": TAMPER + f"os.kill({victim}, 9)\n",
    }


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    targets = _targets(root)
    victim = subprocess.Popen(["sleep", "60"])
    try:
        programs = {**FORGE, **HOOK_AND_FD, **_damage_programs(targets, victim.pid)}
        results = dict(zip(programs, run_many(list(programs.values()), LIMITS, workers=4)))
        alive = victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
    return results, targets, alive


ALL = [*FORGE, *HOOK_AND_FD, *_damage_programs(dict.fromkeys(
    ("outside", "dataset", "run", "stdlib"), Path("/x")), 0)]


def test_the_suite_is_large_enough():
    assert len(ALL) >= 25


@pytest.mark.parametrize("name", ALL)
def test_hostile_program_fails_closed(outcome, name):
    results, _, _ = outcome
    res = results[name]
    assert not res.passed, (name, res.message, res.output)
    assert res.error is not None


def test_no_damage_outside_the_sandbox(outcome):
    _, targets, alive = outcome
    assert not targets["outside"].exists()
    assert targets["dataset"].read_text() == "{}"
    assert not targets["run"].exists()
    assert not targets["stdlib"].exists()
    assert (STDLIB / "json" / "__init__.py").exists()
    assert alive  # the process the programs tried to kill


def test_output_stays_bounded(outcome):
    results, _, _ = outcome
    assert len(results["gigabytes_of_output"].output) <= 2000


@pytest.mark.skipif(not NAMESPACES, reason="needs the PID namespace (kills everything otherwise)")
def test_kill_everything_only_kills_the_sandbox():
    res = run_python("import sys, os\n" + TAMPER + "os.kill(-1, 9)\n", LIMITS)
    assert not res.passed


THREADS = """import threading
out = []
ts = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]
[t.start() for t in ts]
[t.join() for t in ts]
assert sorted(out) == list(range(8))
"""
POOL = """from concurrent.futures import ThreadPoolExecutor
with ThreadPoolExecutor(4) as ex:
    assert list(ex.map(abs, [-1, -2])) == [1, 2]
"""
FRAMES = """import collections, sys, logging
P = collections.namedtuple('P', 'x y')
assert P(1, 2).x == 1
logging.getLogger('x').warning('frames are fine: %s', sys._getframe().f_code.co_name)
"""


def test_legitimate_threads_and_a_finished_program_still_pass():
    for res in run_many([THREADS, POOL, FRAMES], LIMITS, workers=3):
        assert res.passed, res.message


def test_without_namespaces_it_warns_and_still_runs(monkeypatch, caplog):
    from moco_ray.tasks import sandbox

    monkeypatch.setattr(sandbox, "_bwrap_binary", lambda: None)
    with caplog.at_level("WARNING", logger=sandbox.__name__):
        assert sandbox._isolation.__wrapped__() == (None, False)
    assert "audit hooks only" in caplog.text
    monkeypatch.setattr(sandbox, "_isolation", lambda: (None, False))
    good, bad, forged = run_many(["print('ok')\n", "assert False\n", FORGE["forge_frame_locals"]],
                                 LIMITS, workers=3)
    assert good.passed and "ok" in good.output
    assert not bad.passed and bad.error == "exception"
    assert not forged.passed
