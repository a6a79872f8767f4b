"""Remote builds through a darwin-vz-nix builder guest, for the benchmarks (scripts/bench, bench/remote-build).

The host's nix-build (Debian's nix-bin) is the client: ssh-ng through our port with the instance's pinned key,
through a relay that counts the bytes each way (ssh's ProxyCommand).
"""
import json, os, subprocess, sys, time

# Counts the bytes of one ssh connection each way; appends "<sent> <received>" to its second argument.
RELAY = '''import os, signal, socket, sys, threading
port, out = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port))
n = [0, 0]
def dump(*_):
    with open(out, "a") as f: f.write(f"{n[0]} {n[1]}\\n")
    os._exit(0)
for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGPIPE): signal.signal(sig, dump)
def up():
    while d := os.read(0, 65536):
        s.sendall(d); n[0] += len(d)
    dump()  # ssh is done: exit now, or the stderr pipe we inherited keeps nix-build waiting
threading.Thread(target=up, daemon=True).start()
while d := s.recv(65536):
    os.write(1, d); n[1] += len(d)
dump()
'''


def host_env():
    """The host Nix as the benchmarks use it: no substituters, no build users, no sandbox; the local daemon-less store."""
    env = dict(os.environ, DVN_HOST_NIX_STORE="/nix/store", NIX_CONFIG="substituters =\nbuild-users-group =\nsandbox = false\n")
    env.pop("NIX_REMOTE", None)
    return env


def drv(name, script):
    """A derivation with no inputs: /bin/sh -c script."""
    return f'(derivation {{ name = "{name}"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" {json.dumps(script)} ]; }})'


class RemoteBuilds:
    def __init__(self, dvn, state, work, env):
        self.dvn, self.state, self.work, self.env = dvn, state, work, env
        self.relay = os.path.join(work, "count.py")
        with open(self.relay, "w") as f:
            f.write(RELAY)

    def cli(self, *args):
        return subprocess.run([self.dvn, "--state-dir", self.state, *args], capture_output=True, text=True, env=self.env)

    def build(self, expr, builders=True, counter=None):
        """nix-build of `expr`: through the builder only (max-jobs 0, 2 remote jobs), or locally (max-jobs 2).
        Returns (seconds, output paths)."""
        path = os.path.join(self.work, "x.nix")
        with open(path, "w") as f:
            f.write(expr)
        args = ["nix-build", path, "--no-out-link"]
        e = dict(self.env)
        if builders:
            port = json.loads(self.cli("status", "--json").stdout)["sshPort"]
            proxy = os.path.join(self.work, "proxy")
            with open(proxy, "w") as f:
                f.write(f"#!/bin/sh\nexec python3 {self.relay} {port} {counter or '/dev/null'}\n")
            os.chmod(proxy, 0o755)
            state = self.state
            e["NIX_SSHOPTS"] = (f"-p {port} -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes "
                                f"-o UserKnownHostsFile={state}/ssh/known_hosts -o GlobalKnownHostsFile=/dev/null "
                                f"-o HostKeyAlias=darwin-vz-nix -o ProxyCommand={proxy}")
            args += ["--max-jobs", "0", "--builders", f"ssh-ng://builder@127.0.0.1 x86_64-linux {state}/ssh/id_ed25519 2 1"]
        else:
            args += ["--max-jobs", "2"]
        t = time.monotonic()
        out = subprocess.run(args, capture_output=True, text=True, env=e)
        took = time.monotonic() - t
        if out.returncode != 0:
            sys.exit(f"nix-build failed:\n{out.stderr}")
        return took, out.stdout.split()

    def trivial(self, count, nonce):
        """`count` trivial derivations through the builder, then as many (other names) locally.
        Returns (seconds through the builder, seconds locally, every output path made)."""
        def many(side):
            return "[ " + " ".join(drv(f"dvn-bench-t-{nonce}-{side}{i}", "echo $RANDOM > $out") for i in range(count)) + " ]"
        t_builder, outs_builder = self.build(many("b"))
        t_local, outs_local = self.build(many("l"), builders=False)
        return t_builder, t_local, outs_builder + outs_local
