"""Per-instance supervisor, run as its own process by the process and runc drivers.

Why a separate process: machines must outlive the orchestrator (flyd restarts without killing VMs)
yet their exit codes must not be lost. The shim is started in its own session, owns the instance,
and writes the outcome to ``exit.json`` in the instance directory, where a restarted orchestrator
finds it. It imports almost nothing (no json, no subprocess, ctypes only when needed) and runs
with ``python -I -S``, so it is up in about ten milliseconds.

Invocation (arguments, not a config file, to keep startup cheap):

* ``shim.py <dir> process <namespaces:0|1> <hostname> <log> <netns|-> -- <cmd...>`` — the
  environment of the shim is the command's. The shim (O) forks a supervisor (S) that forks the
  command (C). O first joins the network namespace file ``netns`` when one is given (the
  machine's, prepared by the orchestrator). With
  namespaces (root only), O then unshares pid/uts/ipc namespaces, so S is PID 1 of a fresh pid
  namespace; S unshares a mount namespace of its own for a private /proc (and, when the driver
  wrote ``<dir>/hosts``, a private /etc/hosts; when it wrote ``<dir>/mounts``, the volumes
  bound at their paths) and sets the hostname. When the driver wrote ``<dir>/rootfs.path`` (an
  image from a registry), those mounts are made inside that root, the host's /dev is bound in,
  and S chroots there before forking C (so an exec that enters S's root lands in it too); C
  starts in the image's working directory (``<dir>/cwd``) as its user (``<dir>/user``: uid,
  gid and supplementary groups).
  O writes ``pids.json`` only once S has set all this up, so an exec entering S's namespaces
  and root never sees the host's instead.
  S forwards TERM/INT/HUP/QUIT/USR1/USR2 to C (a PID 1 without handlers would ignore them),
  reaps orphans, writes C's status, then kills its process group so nothing outlives C.
* ``shim.py <dir> runc <runc> <runc-root> <bundle> <id> <log>`` — O becomes a child subreaper and
  runs ``runc create``; the container's init is reparented to O, which waits for it, reads the
  memory cgroup's OOM-kill counter and writes the status. ``runc start`` is the driver's job.

Files written, atomically: ``pids.json`` (``shim``, ``main`` = the pid to signal, ``pgid``,
``starttime`` of the shim for pid-reuse checks, ``memory_cgroup``), ``exit.json`` (``exit_code`` or
``signal``, ``oom_killed``, ``exited_at``), ``error.json`` when setup failed.
"""

import _signal
import os
import sys
import time

TYPE_CHECKING = False  # typing costs the shim ~10 ms of start-up; mypy reads this as True
if TYPE_CHECKING:
    from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND = 0x2, 0x4, 0x8, 0x1000
PR_SET_CHILD_SUBREAPER = 36
SIGKILL = 9
FORWARDED = (15, 2, 1, 3, 10, 12)  # TERM INT HUP QUIT USR1 USR2


def encode(value):
    """Enough JSON for flat dicts of str/int/float/bool/None (json would cost ~10 ms to import)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        out = []
        for ch in value:
            if ch in '"\\':
                out.append("\\" + ch)
            elif ord(ch) < 0x20:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    return "{" + ", ".join(encode(str(k)) + ": " + encode(v) for k, v in value.items()) + "}"


def write_json(directory, name, data):
    """Atomic (rename) but not fsynced: these files must survive the orchestrator dying, which
    the page cache does; after a power loss the processes they describe are gone anyway.
    ``directory`` is a path, or an open directory's descriptor (S after its chroot)."""
    if isinstance(directory, int):
        tmp, dest, dir_fd = "." + name + ".tmp", name, directory
    else:
        tmp = os.path.join(directory, "." + name + ".tmp")
        dest, dir_fd = os.path.join(directory, name), None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, encode(data).encode())
    finally:
        os.close(fd)
    os.replace(tmp, dest, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def starttime(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def status_dict(status, oom=False):
    out = {"exit_code": None, "signal": None, "oom_killed": oom, "exited_at": time.time()}
    if os.WIFSIGNALED(status):
        out["signal"] = os.WTERMSIG(status)
    else:
        out["exit_code"] = os.WEXITSTATUS(status)
    return out


def libc():
    import ctypes

    lib = ctypes.CDLL(None, use_errno=True)
    lib.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]

    def check(rc, what):
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    return lib, check


def execvp(cmd):
    """os.execvp without its lazy imports (after a chroot into an image there is no stdlib)."""
    if "/" in cmd[0]:
        os.execv(cmd[0], cmd)
    error: OSError = FileNotFoundError(2, "not found in PATH", cmd[0])
    for d in os.environ.get("PATH", "/usr/bin:/bin").split(":"):
        try:
            os.execv(os.path.join(d or ".", cmd[0]), cmd)
        except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
            error = e
    raise error


def image_process(directory):
    """The image's working directory and user ``[uid, gid, *groups]`` from ``<dir>/cwd`` and
    ``<dir>/user``, or None."""
    cwd, user = None, None
    path = os.path.join(directory, "cwd")
    if os.path.exists(path):
        with open(path) as f:
            cwd = "/" + f.read().strip().lstrip("/")
    path = os.path.join(directory, "user")
    if os.path.exists(path):
        with open(path) as f:
            user = [int(n) for n in f.read().split()]
    return cwd, user


def supervise(directory, hostname, log_path, cmd, in_namespace, ready):
    """S: runs the command as a child, forwards signals, writes its status, kills the group.
    Writes to the pipe ``ready`` once its namespaces, mounts and root are set up."""
    os.setpgid(0, 0)
    root = None
    cwd, user = None, None
    if in_namespace:
        # a mount namespace of S's own (not O's), private so nothing propagates to the host,
        # with a /proc that shows only the new pid namespace
        lib, check = libc()
        check(lib.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        check(lib.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        root_file = os.path.join(directory, "rootfs.path")  # an image's root to chroot into
        if os.path.exists(root_file):
            with open(root_file) as f:
                root = f.read().strip()
            cwd, user = image_process(directory)
        inside = root or "/"
        os.makedirs(os.path.join(inside, "proc"), exist_ok=True)
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        proc = os.path.join(inside, "proc").encode()
        check(lib.mount(b"proc", proc, b"proc", flags, None), "mount /proc")
        if root is not None:
            dev = os.path.join(root, "dev")
            os.makedirs(dev, exist_ok=True)
            check(lib.mount(b"/dev", dev.encode(), None, MS_BIND | MS_REC, None), "bind /dev")
        hosts = os.path.join(directory, "hosts")  # written for an instance on its own network
        if os.path.exists(hosts):
            target = os.path.join(inside, "etc/hosts")
            if not os.path.exists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
            check(lib.mount(hosts.encode(), target.encode(), None, MS_BIND, None),
                  "bind /etc/hosts")  # fmt: skip
        mounts = os.path.join(directory, "mounts")  # volumes: "<host dir>\t<path>" lines
        if os.path.exists(mounts):
            with open(mounts) as f:
                for line in f.read().splitlines():
                    source, target = line.split("\t")
                    target = os.path.join(inside, target.lstrip("/"))
                    os.makedirs(target, exist_ok=True)
                    flags = MS_BIND | MS_REC
                    check(lib.mount(source.encode(), target.encode(), None, flags, None),
                          f"bind {target}")  # fmt: skip
        name = hostname.encode()[:63]
        if name:
            check(lib.sethostname(name, len(name)), "sethostname")
    child: dict[str, Any] = {"pid": None, "pending": []}

    def forward(signum, _frame):
        if child["pid"] is None:
            child["pending"].append(signum)
            return
        try:  # noqa: SIM105 - contextlib costs startup time
            os.kill(child["pid"], signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        _signal.signal(sig, forward)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if root is not None:  # the status is written through the directory opened before
        directory = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        os.chroot(root)
        os.chdir("/")
        if cwd is not None:
            # made when missing, as Docker does; only now, inside the root, so a symlink in
            # the image cannot lead out of it. C inherits it, and an exec takes S's (nsenter --wd)
            try:
                os.makedirs(cwd, exist_ok=True)
                os.chdir(cwd)
            except OSError as e:  # the machine exits 1; its log says why
                os.write(log, f"shim: cannot enter the working directory {cwd!r}: {e}\n".encode())
                os._exit(1)
    os.write(ready, b"1")  # O publishes pids.json now: an exec from then on lands in the root
    os.close(ready)
    pid = os.fork()
    if pid == 0:
        try:
            for sig in FORWARDED:
                _signal.signal(sig, _signal.SIG_DFL)
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, FORWARDED)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            if user is not None:  # groups first: after setuid they can no longer be set
                os.setgroups(user[2:])
                os.setgid(user[1])
                os.setuid(user[0])
            execvp(cmd)
        # the forked child must never return into the shim's code: report like a shell, exit
        except BaseException as e:  # noqa: BLE001
            try:
                os.write(2, f"shim: cannot run {cmd[0]!r}: {e}\n".encode())
            finally:
                os._exit(127)
    child["pid"] = pid
    os.close(log)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, FORWARDED)
    for signum in child["pending"]:
        forward(signum, None)
    status = None
    while True:
        try:
            reaped, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if reaped == pid:
            status = st
            break
    if status is None:
        result = {"exit_code": None, "signal": None, "oom_killed": False, "exited_at": time.time()}
    else:
        result = status_dict(status)
    write_json(directory, "exit.json", result)
    os.killpg(os.getpgid(0), SIGKILL)  # stragglers go too (PID 1 of a namespace is immune)
    os._exit(0)


def run_process(directory, args):
    namespaces, hostname, log_path, netns, sep, *cmd = args
    if sep != "--" or not cmd:
        raise ValueError("usage: process <namespaces> <hostname> <log> <netns|-> -- <cmd...>")
    in_namespace = namespaces == "1" and os.geteuid() == 0
    me = os.getpid()
    born = starttime(me)
    if netns != "-":
        lib, check = libc()
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            check(lib.setns(fd, CLONE_NEWNET), f"setns({netns})")
        finally:
            os.close(fd)
    if in_namespace:
        lib, check = libc()
        check(lib.unshare(CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC), "unshare")
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            supervise(directory, hostname, log_path, cmd, in_namespace, ready_w)
        finally:
            os._exit(1)
    os.close(ready_w)
    # S does this too; doing it here as well means the group exists before pids.json does
    try:  # noqa: SIM105 - contextlib costs startup time
        os.setpgid(pid, pid)
    except OSError:
        pass
    os.read(ready_r, 1)  # S is set up (or died: end of file, and its status is written below)
    os.close(ready_r)
    write_json(directory, "pids.json", {"shim": me, "main": pid, "pgid": pid, "starttime": born})
    _, status = os.waitpid(pid, 0)
    if not os.path.exists(os.path.join(directory, "exit.json")):
        write_json(directory, "exit.json", status_dict(status))


def memory_cgroup(pid):
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    return path
    except OSError:
        pass
    return None


def oom_killed(cgroup):
    if not cgroup:
        return False
    for candidate in (
        f"/sys/fs/cgroup/memory{cgroup}/memory.oom_control",
        f"/sys/fs/cgroup{cgroup}/memory.events",
    ):
        try:
            with open(candidate) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
        except (OSError, ValueError):
            continue
    return False


def run_runc(directory, args):
    runc, root, bundle, cid, log_path = args
    lib, check = libc()
    check(lib.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
    pid_file = os.path.join(directory, "init.pid")
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    start = os.lseek(log, 0, os.SEEK_END)
    # runc hands its own stdio to the container: no pipe here, it would stay open for the
    # container's whole life
    pid = os.fork()
    if pid == 0:
        try:
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, FORWARDED)  # or the container inherits it
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            argv = [runc, "--root", root, "create", "--bundle", bundle, "--pid-file", pid_file, cid]
            os.execv(runc, argv)
        finally:
            os._exit(127)
    os.close(log)
    _, create_status = os.waitpid(pid, 0)
    if not os.WIFEXITED(create_status) or os.WEXITSTATUS(create_status) != 0:
        with open(log_path, "rb") as f:
            f.seek(start)
            message = f.read()[-2000:].decode(errors="replace").strip()
        write_json(directory, "error.json", {"message": f"runc create: {message}"})
        return
    with open(pid_file) as f:
        init = int(f.read().strip())
    cgroup = memory_cgroup(init)
    me = os.getpid()
    pids = {"shim": me, "main": init, "pgid": None, "starttime": starttime(me)}
    pids["memory_cgroup"] = cgroup
    write_json(directory, "pids.json", pids)
    status = None
    while True:
        try:
            reaped, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if reaped == init:
            status = st
            break
    if status is None:  # not our child after all: watch /proc until it is gone
        while os.path.exists(f"/proc/{init}"):
            time.sleep(0.02)
        result = {"exit_code": None, "signal": None, "oom_killed": False, "exited_at": time.time()}
    else:
        result = status_dict(status, oom_killed(cgroup))
    write_json(directory, "exit.json", result)


def _pending(_signum, _frame):
    """Placeholder handler (see main); never runs in O, which keeps these signals blocked."""


def main(argv):
    directory, mode, *args = argv[1:]
    # Handled (by a no-op) and blocked, not ignored: S inherits both, so a signal that reaches
    # S before its forwarding handler is installed stays pending and is forwarded then. It must
    # be *handled*: the kernel drops, at send time, an unhandled signal sent to the init of a
    # pid namespace, blocked or not. O itself never unblocks.
    for sig in FORWARDED:
        _signal.signal(sig, _pending)
    _signal.pthread_sigmask(_signal.SIG_BLOCK, FORWARDED)
    try:
        if mode == "runc":
            run_runc(directory, args)
        elif mode == "process":
            run_process(directory, args)
        else:
            raise ValueError(f"unknown mode {mode!r}")
    except BaseException as e:  # noqa: BLE001 — the shim's last word: any ending is recorded
        try:  # noqa: SIM105
            write_json(directory, "error.json", {"message": f"{type(e).__name__}: {e}"})
        except OSError:
            pass
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
