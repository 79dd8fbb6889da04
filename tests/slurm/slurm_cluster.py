"""A private Slurm cluster on this machine, for testing slurm/*.sh with real sbatch/srun.

Everything lives in one temporary directory: a munge key and munged socket, slurm.conf,
the controller's state, each slurmd's spool and the logs. The daemons run in the
foreground as children of the test process (so they are ours to stop, by pid), on free
ports, and clients find them through SLURM_CONF. Nothing under /etc is touched.

Two layouts:

- one node: slurmd on this host in the root network namespace, NodeName = hostname;
- several nodes: each slurmd in its own network namespace (`ip netns`) with a veth into
  a bridge whose address is the controller's, its own /etc/hosts (the machine's hostname
  resolves to the node's own address, as on a real cluster: torch's gloo advertises that
  address to its peers) and its own /dev/shm; /tmp stays shared, like a cluster
  filesystem. Node names are node1, node2, ...; NodeAddr is the namespace's address.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")


class ClusterError(RuntimeError):
    pass


def binary(name: str) -> str | None:
    """Full path of a Slurm/munge program (daemons live in /usr/sbin, off a user's PATH)."""
    found = shutil.which(name)
    if found is None and Path("/usr/sbin", name).exists():
        found = str(Path("/usr/sbin", name))
    return found


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if binary(name) is None]


def install_slurm() -> str | None:
    """Install Debian's slurm-wlm and munge if missing. Returns a reason to skip, or None.

    Only a machine that cannot install packages at all is a reason to skip (not root,
    no apt-get); an install that fails there is an error."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(missing_binaries())} missing) and installing it needs root"
    if shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(missing_binaries())} missing) and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if first.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if second.returncode != 0:
            raise ClusterError(f"apt-get install slurm-wlm munge failed:\n{second.stdout[-2000:]}{second.stderr[-2000:]}")
    if missing_binaries():
        raise ClusterError(f"slurm-wlm installed but {', '.join(missing_binaries())} still missing")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _run(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


@dataclass
class Node:
    name: str
    addr: str | None = None  # NodeAddr; None: the name resolves
    netns: str | None = None  # run slurmd in this network namespace
    hosts: str | None = None  # /etc/hosts inside it


@dataclass
class NetnsNetwork:
    """A bridge in the root namespace (the controller's address) and one namespace per
    node, each with a veth into the bridge. Interface names carry a per-process tag."""

    count: int
    tag: str = field(default_factory=lambda: f"mf{os.getpid() % 100000}")
    bridge: str = ""
    gateway: str = ""
    names: list[str] = field(default_factory=list)
    addrs: list[str] = field(default_factory=list)
    _veths: list[str] = field(default_factory=list)

    @staticmethod
    def available() -> str | None:
        """None when network namespaces work here, else the reason they do not."""
        if shutil.which("ip") is None:
            return "iproute2's `ip` is not installed"
        if os.geteuid() != 0:
            return "network namespaces need root"
        probe = f"mfprobe{os.getpid() % 100000}"
        made = _run(["ip", "netns", "add", probe], check=False)
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()}"
        try:
            veth = _run(["ip", "link", "add", f"{probe}a", "type", "veth", "peer", "name", f"{probe}b"], check=False)
            if veth.returncode != 0:
                return f"cannot create a veth pair: {veth.stderr.strip()}"
            _run(["ip", "link", "del", f"{probe}a"], check=False)
            bridge = _run(["ip", "link", "add", f"{probe}br", "type", "bridge"], check=False)
            if bridge.returncode != 0:
                return f"cannot create a bridge: {bridge.stderr.strip()}"
            _run(["ip", "link", "del", f"{probe}br"], check=False)
        finally:
            _run(["ip", "netns", "del", probe], check=False)
        return None

    def _subnet(self) -> ipaddress.IPv4Network:
        used = _run(["ip", "-4", "-o", "addr"]).stdout + _run(["ip", "-4", "route"]).stdout
        for third in range(200, 255):
            net = ipaddress.IPv4Network(f"10.213.{third}.0/24")
            if f"10.213.{third}." not in used:
                return net
        raise ClusterError("no free 10.213.x.0/24 subnet for the test network")

    def up(self) -> None:
        net = self._subnet()
        hosts = list(net.hosts())
        self.gateway = str(hosts[0])
        self.bridge = f"{self.tag}br"
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for i in range(1, self.count + 1):
            ns, host_end, addr = f"{self.tag}n{i}", f"{self.tag}h{i}", str(hosts[10 + i])
            _run(["ip", "netns", "add", ns])
            self.names.append(ns)
            _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns])
            self._veths.append(host_end)
            _run(["ip", "link", "set", host_end, "master", self.bridge, "up"])
            for cmd in (["ip", "addr", "add", f"{addr}/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                        ["ip", "link", "set", "lo", "up"]):
                _run(["ip", "netns", "exec", ns, *cmd])
            self.addrs.append(addr)

    def down(self) -> None:
        for veth in self._veths:
            _run(["ip", "link", "del", veth], check=False)
        for ns in self.names:
            _run(["ip", "netns", "del", ns], check=False)
        if self.bridge:
            _run(["ip", "link", "del", self.bridge], check=False)
        self._veths, self.names = [], []


class SlurmCluster:
    def __init__(self, nodes: list[Node], *, name: str = "mftest", cpus: int | None = None,
                 control_addr: str | None = None, shm_per_node: bool = False):
        self.nodes = nodes
        self.name = name
        self.cpus = cpus or os.cpu_count() or 1
        self.control_addr = control_addr
        self.shm_per_node = shm_per_node
        # A directory the munge socket's parents let everyone traverse (munged insists).
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-slurm-"))
        self.dir.chmod(0o755)
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "run" / "munge.sock"
        self._procs: list[tuple[str, subprocess.Popen]] = []

    # -- lifecycle ----------------------------------------------------------------
    def start(self, timeout: float = 60) -> "SlurmCluster":
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", [binary("slurmctld"), "-D", "-f", str(self.conf)])
            for node in self.nodes:
                self._start_slurmd(node)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if any(n == "slurmctld" and p.poll() is None for n, p in self._procs):
            ids = self.job_ids()
            if ids:
                self.run(["scancel", *ids], check=False)
            deadline = time.time() + 30
            while self.job_ids() and time.time() < deadline:
                time.sleep(0.5)
        for name, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs = []
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- clients ------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def run(self, cmd, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
        env = kw.pop("env", None) or self.env
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job_ids(self) -> list[str]:
        out = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout
        return out.split()

    def job_field(self, job_id: str, key: str) -> str:
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        for token in out.split():
            if token.startswith(key + "="):
                return token.split("=", 1)[1]
        raise KeyError(f"{key} not in scontrol show job {job_id}")

    def logs(self) -> str:
        parts = []
        for path in sorted(self.dir.glob("*.log")):
            parts.append(f"==> {path.name} <==\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)

    # -- internals ----------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.dir / f"{name}.stdout", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=dict(os.environ, SLURM_CONF=str(self.conf)))
        self._procs.append((name, proc))
        time.sleep(0.2)
        if proc.poll() is not None:
            raise ClusterError(f"{name} exited at once ({proc.returncode}):\n{(self.dir / f'{name}.stdout').read_text()}\n{self.logs()}")
        return proc

    def _start_munge(self) -> None:
        keydir, rundir = self.dir / "munge", self.dir / "run"
        keydir.mkdir(mode=0o700)
        rundir.mkdir(mode=0o755)
        key = keydir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn("munged", [binary("munged"), "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={rundir / 'munged.pid'}", f"--log-file={self.dir / 'munged.log'}",
                               f"--seed-file={keydir / 'seed'}"])
        deadline = time.time() + 10
        while not self.munge_socket.exists() and time.time() < deadline:
            time.sleep(0.1)
        probe = subprocess.run(f"munge -n -S {self.munge_socket} | unmunge -S {self.munge_socket}", shell=True,
                               capture_output=True, text=True)
        if probe.returncode != 0:
            raise ClusterError(f"munged does not answer: {probe.stderr}\n{self.logs()}")

    def _write_conf(self) -> None:
        d = self.dir
        (d / "state").mkdir()
        for node in self.nodes:
            (d / f"spool-{node.name}").mkdir()
        host = socket.gethostname().split(".")[0]
        ctld = f"{host}({self.control_addr})" if self.control_addr else host
        mem = 4000 if len(self.nodes) > 1 else 8000
        node_lines = []
        for node in self.nodes:
            addr = f" NodeAddr={node.addr}" if node.addr else ""
            node_lines.append(f"NodeName={node.name}{addr} CPUs={self.cpus} RealMemory={mem} State=UNKNOWN")
        self.conf.write_text("\n".join([
            f"ClusterName={self.name}",
            f"SlurmctldHost={ctld}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: a requeued job waits this long before it may start again
            # (default 120 s); 5 is the smallest Slurm accepts.
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobRequeue=1",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            # A requeued job becomes eligible after cred_expire without an event that
            # triggers scheduling: look for it every second, not every 30 (backfill).
            "SchedulerParameters=bf_interval=1,sched_interval=2",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "KillWait=5",
            "MinJobAge=60",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool-%n'}",
            f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            *node_lines,
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _start_slurmd(self, node: Node) -> None:
        cmd = [binary("slurmd"), "-D", "-N", node.name, "-f", str(self.conf)]
        if node.netns:
            # A mount namespace of its own for the node's /etc/hosts and /dev/shm, then
            # the network namespace. Not `ip netns exec`: it remounts /sys for the
            # namespace, which hides /sys/fs/cgroup, and slurmd 22.05 will not start
            # without its cgroup plugin even under proctrack/linuxproc.
            setup = []
            if node.hosts is not None:
                hosts = self.dir / f"hosts-{node.name}"
                hosts.write_text(node.hosts)
                setup.append(f"mount --bind {hosts} /etc/hosts")
            if self.shm_per_node:
                setup.append("mount -t tmpfs -o size=4g,mode=1777 tmpfs /dev/shm")
            script = " && ".join(setup + ['exec "$@"'])
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "slurmd-wrapper",
                   "nsenter", f"--net=/run/netns/{node.netns}", *cmd]
        self._spawn(f"slurmd-{node.name}", cmd)

    def _wait_idle(self, timeout: float) -> None:
        names = {n.name for n in self.nodes}
        deadline = time.time() + timeout
        states = ""
        while time.time() < deadline:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise ClusterError(f"{name} died ({proc.returncode})\n{self.logs()}")
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = out.stdout.strip()
            idle = {line.split()[0] for line in states.splitlines() if line.split()[1:] == ["idle"]}
            if names <= idle:
                return
            time.sleep(0.5)
        raise ClusterError(f"nodes not idle after {timeout}s: {states!r}\n{self.logs()}")
