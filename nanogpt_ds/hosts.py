"""
Several machines: what a node checks before it launches. DeepSpeed's runner reads the hostfile and starts the
ranks, over ssh on every host (pdsh), or one command per node (--no_ssh, for SLURM or Kubernetes, where nodes
do not ssh to each other). What would make it fail later, or hang, is found here first, in one line.
    python -m nanogpt_ds.hosts HOSTFILE [NODE_RANK MASTER_ADDR MASTER_PORT] [--cpu]
prints the nodes and ranks, or one `error:` line and exits 1. run_deepspeed_xl.sh calls it.
"""
import logging
import os
import socket
import sys
import time

# a node other than 0 waits this long for node 0's rank 0 to listen on the master port (nodes started one by
# one, each by hand, are seconds to minutes apart)
MASTER_WAIT_S = 120


def read_hostfile(path):
    """{host: slots}, in order, by DeepSpeed's own parser (what its runner will read). ValueError naming the
    fix."""
    if not os.path.isfile(path):
        raise ValueError(f'hostfile {path} not found: write one line per node, like "node1 slots=4"')
    from deepspeed.launcher.runner import fetch_hostfile
    logging.getLogger('DeepSpeed').setLevel(logging.CRITICAL)  # its own complaint would be a second line
    try:
        hosts = fetch_hostfile(path)
    except ValueError as e:
        raise ValueError(f'hostfile {path}: {e}; write one line per node, like "node1 slots=4"') from None
    empty = [host for host, slots in hosts.items() if slots < 1]
    if empty:
        raise ValueError(f'hostfile {path} gives {empty[0]} slots=0: give every node 1 slot or more')
    return hosts


def check_slots(host, slots, cpu):
    """ValueError when this node has fewer devices than its slots: GPUs, or CPU cores for CPU ranks."""
    if cpu:
        cores = os.cpu_count() or 1
        if slots > cores:
            raise ValueError(f'{host} has slots={slots} in the hostfile but {cores} CPU core(s) here: give '
                             f'it slots={cores} or fewer')
        return
    import torch
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise ValueError(f'{host} has slots={slots} in the hostfile but this node has no GPU: run this on '
                         f'the node the line is for, or CPU ranks with --cpu-demo')
    if slots > gpus:
        raise ValueError(f'{host} has slots={slots} in the hostfile but this node has {gpus} GPU(s): give it '
                         f'slots={gpus}, or run this on the node the line is for')


def check_master(node_rank, master_addr, master_port):
    """ValueError when the master address does not resolve; node 0 (rank 0 listens there) must be able to
    listen on it, and any other node must reach it within MASTER_WAIT_S."""
    try:
        address = socket.getaddrinfo(master_addr, master_port, type=socket.SOCK_STREAM)[0][4]
    except socket.gaierror as e:
        raise ValueError(f'--master_addr {master_addr} does not resolve here ({e.strerror}): give node 0\'s '
                         f'address as every node reaches it') from None
    if node_rank == 0:
        try:
            with socket.socket(socket.AF_INET6 if ':' in address[0] else socket.AF_INET) as s:
                s.bind(address)
        except OSError as e:
            raise ValueError(f'node 0 cannot listen on {master_addr}:{master_port} ({e.strerror}): '
                             f"--master_addr must be this node's own address, --master_port a free "
                             f'port') from None
        return
    deadline, said = time.time() + MASTER_WAIT_S, False
    while True:
        try:
            socket.create_connection(address, timeout=2).close()
            return
        except OSError as e:
            reason = e.strerror or type(e).__name__
        if time.time() > deadline:
            raise ValueError(f'{master_addr}:{master_port} did not answer from this node in {MASTER_WAIT_S} '
                             f's ({reason}): start node 0 too, and check that this node can reach that '
                             f'address and port (a firewall, the wrong interface)')
        if not said:
            print(f'waiting for node 0 at {master_addr}:{master_port} ...', file=sys.stderr, flush=True)
            said = True
        time.sleep(1)


def describe(path, node_rank=None, master_addr='', master_port=0, cpu=False):
    """The line that says what will run; ValueError (one line, its fix) for what cannot."""
    hosts = read_hostfile(path)
    ranks = sum(hosts.values())
    nodes = ', '.join(f'{host} ({slots})' for host, slots in hosts.items())
    if node_rank is None:
        return f'{len(hosts)} node(s), {ranks} rank(s), started over ssh by pdsh: {nodes}'
    if not 0 <= node_rank < len(hosts):
        raise ValueError(f'--node_rank {node_rank}, but {path} lists {len(hosts)} node(s): give each node '
                         f'its line number in the hostfile, 0 to {len(hosts) - 1}')
    host, slots = list(hosts.items())[node_rank]
    check_slots(host, slots, cpu)
    check_master(node_rank, master_addr, master_port)
    return f'node {node_rank} of {len(hosts)} ({host}, {slots} rank(s)); {ranks} rank(s) in all: {nodes}'


if __name__ == '__main__':
    args = [a for a in sys.argv[1:] if a != '--cpu']
    try:
        if len(args) == 1:
            print(describe(args[0], cpu='--cpu' in sys.argv))
        else:
            hostfile, node_rank, master_addr, master_port = args
            print(describe(hostfile, int(node_rank), master_addr, int(master_port), cpu='--cpu' in sys.argv))
    except ValueError as e:
        from nanogpt_ds.settings import die  # the one way to stop on a user error
        die(str(e))
