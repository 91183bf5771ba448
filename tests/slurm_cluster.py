"""A real single-node SLURM cluster for tests: everything under one directory.

Follows ``shared/design/slurm.md`` (Debian 12, SLURM 22.05, as root, without
systemd or cgroups): a private munged with its own key and socket, then
``slurmctld -D`` and ``slurmd -D`` detached, configured by a slurm.conf in
the directory that every client command finds through ``SLURM_CONF``
(`LocalSlurm.env`). `install()` installs the Debian packages when they are
missing; `unavailable()` says why a cluster cannot run here (not root, no
apt), or None.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged")


def _have_binaries() -> bool:
  return all(shutil.which(b) or os.path.exists(f"/usr/sbin/{b}")
             for b in BINARIES)


def unavailable() -> str | None:
  """Why a test cluster cannot run on this machine, or None."""
  if os.geteuid() != 0:
    return "the test SLURM cluster runs daemons as root; this is not root"
  if not _have_binaries() and not shutil.which("apt-get"):
    return (f"SLURM is not installed and there is no apt-get to install "
            f"{' '.join(PACKAGES)}")
  return None


def install() -> None:
  """Installs the Debian packages (about 20 s) unless they are there; one
  process at a time (test workers start their clusters together)."""
  with open("/tmp/aqt_ext_slurm_install.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if _have_binaries():
      return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq",
                  "--no-install-recommends", *PACKAGES]):
      out = subprocess.run(argv, env=env, capture_output=True, text=True)
      if out.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited with {out.returncode} "
                           f"(installing the test SLURM cluster): "
                           f"{out.stderr.strip()[-2000:]}")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _alive(pid: int) -> bool:
  """Whether `pid` runs (a zombie does not: PID 1 here reaps late)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (FileNotFoundError, IndexError):
    return False


class LocalSlurm:
  """A one-node cluster under `root`, with `cpus` CPUs (may exceed the
  machine's cores: ``SlurmdParameters=config_overrides``)."""

  def __init__(self, root: str | os.PathLike[str], cpus: int = 4):
    self.root = pathlib.Path(root).resolve()
    self.cpus = cpus
    self.node = socket.gethostname().split(".")[0]
    self.conf = self.root / "slurm.conf"
    self.pids: dict[str, int] = {}
    self._logs: list = []

  @property
  def env(self) -> dict[str, str]:
    """The environment of a client command (and of the jobs it submits)."""
    return {**os.environ, "SLURM_CONF": str(self.conf)}

  def _write_config(self) -> None:
    r = self.root
    r.mkdir(parents=True, exist_ok=True)
    r.chmod(0o755)  # munged runs as the munge user (mkdtemp makes 0700)
    for d in ("munge", "state", "spool", "log"):
      (r / d).mkdir(parents=True, exist_ok=True)
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    ctl_port, d_port = _free_port(), _free_port()
    self.conf.write_text("\n".join([
        "ClusterName=aqttest",
        f"SlurmctldHost={self.node}(127.0.0.1)",
        f"SlurmctldPort={ctl_port}", f"SlurmdPort={d_port}",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={r}/munge/munge.socket,cred_expire=10",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,"
        "bf_interval=1,sched_interval=1",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt", f"JobCompLoc={r}/jobcomp.txt",
        "MpiDefault=none", "ReturnToService=2", "MailProg=/bin/true",
        "SlurmdParameters=config_overrides", "MinJobAge=600",
        "KillWait=5",
        f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
        f"SlurmctldPidFile={r}/slurmctld.pid",
        f"SlurmdPidFile={r}/slurmd.pid",
        f"SlurmctldLogFile={r}/log/slurmctld.log",
        f"SlurmdLogFile={r}/log/slurmd.log",
        f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} "
        f"RealMemory={mem_mb // 2} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE "
        "State=UP",
    ]) + "\n")

  def _spawn(self, name: str, argv: list[str]) -> None:
    log = open(self.root / "log" / f"{name}.out", "ab")  # pylint: disable=consider-using-with
    self._logs.append(log)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            env=self.env, start_new_session=True)
    self.pids[name] = proc.pid

  def start(self, timeout: float = 60) -> "LocalSlurm":
    """Starts munged, slurmctld and slurmd; waits for an idle node."""
    install()
    self._write_config()
    munge = self.root / "munge"
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    shutil.chown(munge, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    munge.chmod(0o755)
    self._spawn("munged", [
        "setpriv", "--reuid=munge", "--regid=munge", "--init-groups",
        "munged", "--foreground", f"--key-file={key}",
        f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
        f"--seed-file={munge}/munged.seed", f"--log-file={munge}/munged.log",
        "--force"])
    self._wait(lambda: (munge / "munge.socket").exists(), timeout, "munged")
    self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
    self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
    self._wait(self._node_idle, timeout, "an idle node")
    return self

  def _node_idle(self) -> bool:
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env,
                         capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() == "idle"

  def _wait(self, ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
      dead = [n for n, p in self.pids.items() if not _alive(p)]
      if dead or time.monotonic() > deadline:
        logs = "\n".join(
            f"--- {p.name}:\n{p.read_text(errors='replace')[-2000:]}"
            for p in sorted((self.root / "log").glob("*")) if p.is_file())
        raise RuntimeError(f"the test SLURM cluster did not reach {what} "
                           f"(dead: {dead or 'none'}); logs:\n{logs}")
      time.sleep(0.2)

  def run(self, *argv: str, check: bool = True) -> str:
    """A client command's stdout."""
    out = subprocess.run(list(argv), env=self.env, capture_output=True,
                         text=True)
    if check and out.returncode:
      raise RuntimeError(f"{' '.join(argv)} exited with {out.returncode}: "
                         f"{out.stderr.strip()}")
    return out.stdout

  def stop(self) -> None:
    """Cancels every job, stops the daemons (SIGKILL after 10 s)."""
    if "slurmctld" in self.pids and _alive(self.pids["slurmctld"]):
      self.run("scancel", "--user=root", check=False)
      # A job step ignores SIGTERM once slurmctld is gone: kill it first.
      deadline = time.monotonic() + 10
      while self.run("squeue", "-h", check=False).strip() and \
          time.monotonic() < deadline:
        time.sleep(0.2)
    for name in ("slurmd", "slurmctld", "munged"):
      pid = self.pids.get(name)
      if pid is None or not _alive(pid):
        continue
      os.killpg(pid, signal.SIGTERM)
      deadline = time.monotonic() + 10
      while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
      if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    for log in self._logs:
      log.close()
