"""Several machines: two real hosts on this machine, each a network namespace with an address of its own
(joined by a veth pair), a host name of its own and a disk of its own (its folder mounted over the common
out_dir), each running its own DeepSpeed runner (--no_ssh, one command per node) with one CPU rank. Across
them a run trains, saves and resumes exactly as one host with two ranks; a signal on one host saves both; a
host lost in a save stops the other within dist_timeout_s with one line, and both resume from the newest
checkpoint complete on both disks. Needs root (ip netns, mount): skipped, saying why, where not allowed."""
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import BIN, REPO, SAVED_RUN, ZERO3_CHECKPOINTING, by_iter, env, free_port, one_error

from nanogpt_ds import checkpoints, hosts

ADDRESSES = {'A': '10.231.0.1', 'B': '10.231.0.2'}  # inside the namespaces only; host A is the master
MASTER = ADDRESSES['A']


class TwoHosts:
    """hostA and hostB: a namespace, a veth end and a disk (tmp_path/diskA, diskB) each, which each host sees
    at tmp_path/out."""

    def __init__(self, tmp_path):
        tag = f'{os.getpid() % 100000}'
        self.netns = {h: f'ds{tag}{h}' for h in 'AB'}
        self.veth = {h: f'v{tag}{h}' for h in 'AB'}
        self.out, self.disk = tmp_path / 'out', {h: tmp_path / f'disk{h}' for h in 'AB'}
        self.hostfile = tmp_path / 'hostfile'
        self.hostfile.write_text('hostA slots=1\nhostB slots=1\n')
        for folder in (self.out, *self.disk.values()):
            folder.mkdir()
        self.port = free_port()
        self.logs = tmp_path

    def up(self):
        ip = ['ip', 'link', 'add', self.veth['A'], 'type', 'veth', 'peer', 'name', self.veth['B']]
        commands = [['ip', 'netns', 'add', self.netns[h]] for h in 'AB'] + [ip]
        for h in 'AB':
            netns = ['ip', '-n', self.netns[h]]
            commands += [['ip', 'link', 'set', self.veth[h], 'netns', self.netns[h]],
                         [*netns, 'addr', 'add', f'{ADDRESSES[h]}/24', 'dev', self.veth[h]],
                         [*netns, 'link', 'set', self.veth[h], 'up'], [*netns, 'link', 'set', 'lo', 'up']]
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                self.down()
                return f"{' '.join(command)}: {done.stderr.strip()}"
        return ''

    def down(self):
        for h in 'AB':
            for pid in self.pids(h):
                os.kill(pid, signal.SIGKILL)
            subprocess.run(['ip', 'netns', 'del', self.netns[h]], capture_output=True)

    def pids(self, h):
        listed = subprocess.run(['ip', 'netns', 'pids', self.netns[h]], capture_output=True, text=True).stdout
        return [int(pid) for pid in listed.split()]

    def start(self, h, args, script=False):
        """Host h's command for node rank 0 (A) or 1 (B): the deepspeed runner, or run_deepspeed_xl.sh; output
        in tmp_path/<h>.log."""
        node = 'AB'.index(h)
        per_node = ['--hostfile', str(self.hostfile), f'--node_rank={node}', f'--master_addr={MASTER}',
                    f'--master_port={self.port}']
        if script:
            command = ['./run_deepspeed_xl.sh', *per_node, *args]
        else:
            command = [os.path.join(BIN, 'deepspeed'), *per_node, '--no_ssh', 'train_deepspeed.py', *args]
        # a host of its own: its name, and its disk at the common out_dir (ip netns exec gives a mount
        # namespace of its own; unshare a UTS one for the name)
        inside = f'hostname host{h} && mount --bind {self.disk[h]} {self.out} && exec "$@"'
        cmd = ['ip', 'netns', 'exec', self.netns[h], 'unshare', '--uts', 'sh', '-c', inside, 'sh', *command]
        log = open(self.logs / f'{h}-{time.time_ns()}.log', 'w+')
        # each host one core of this machine, as one host's two ranks have: matmuls sum in the same order
        environ = env(GLOO_SOCKET_IFNAME=self.veth[h], OMP_NUM_THREADS='1')
        proc = subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.log = log
        return proc

    def power_cut(self, h):
        """As a power cut loses a host: its link goes first, so no connection reset reaches the other host,
        then every process of it."""
        subprocess.run(['ip', '-n', self.netns[h], 'link', 'set', self.veth[h], 'down'], check=True)
        for pid in self.pids(h):
            os.kill(pid, signal.SIGKILL)

    def power_on(self, h):
        subprocess.run(['ip', '-n', self.netns[h], 'link', 'set', self.veth[h], 'up'], check=True)


def output(proc):
    proc.log.seek(0)
    return proc.log.read()


def finish(*procs, timeout=120):
    """The outputs of started hosts once each has exited."""
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError('still running:\n' + '\n'.join(output(p)[-3000:] for p in procs)) from None
    return [output(proc) for proc in procs]


def both_ok(*procs):
    outputs = finish(*procs)
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    return outputs


@pytest.fixture
def two_hosts(tmp_path):
    if not shutil.which('unshare'):
        pytest.skip('unshare (util-linux) not found: two hosts need it for their own names')
    pair = TwoHosts(tmp_path)
    refused = pair.up()
    if refused:
        pytest.skip(f'two hosts need network namespaces (root): {refused}')
    yield pair
    pair.down()


def wait_for(condition, what, procs, timeout=120):
    """Polls condition every millisecond while the started hosts run."""
    deadline = time.time() + timeout
    while not condition():
        ended = [output(proc)[-3000:] for proc in procs if proc.poll() is not None]
        assert not ended, f'a host ended before {what}:\n' + '\n'.join(ended)
        assert time.time() < deadline, f'timed out waiting for {what}'
        time.sleep(0.001)


def assert_same_run(reference_dir, out_dir, iters):
    """The same losses (fp32, within 1e-6) at every iteration and eval as the reference run logged."""
    reference, losses = by_iter(reference_dir, 'loss'), by_iter(out_dir, 'loss')
    assert sorted(losses) == list(range(iters))
    for i in range(iters):
        assert abs(losses[i] - reference[i]) <= 1e-6, (i, losses[i], reference[i])
    reference, evals = by_iter(reference_dir, 'val_loss'), by_iter(out_dir, 'val_loss')
    for i in reference:
        assert abs(evals[i] - reference[i]) <= 1e-6, (i, evals[i], reference[i])


LOST_AFTER_S = 5  # dist_timeout_s for the tests: a lost host is noticed this long after it stops answering


def lose_host_b(two_hosts, a, b, moment, what):
    """Cut host B's power at the moment; host A must stop within dist_timeout_s (and the time to leave) with
    one line that names its newest checkpoint, which must be complete. Returns that tag."""
    wait_for(moment, what, [a, b])
    two_hosts.power_cut('B')
    lost_at = time.time()
    (out_a,) = finish(a)
    noticed_s = time.time() - lost_at
    assert a.returncode != 0 and noticed_s < LOST_AFTER_S + 10, (noticed_s, out_a[-3000:])
    line = one_error(subprocess.CompletedProcess(a.args, a.returncode, out_a))
    newest = checkpoints.latest_tag(str(two_hosts.disk['A']))
    assert 'rank 0 on hostA lost another rank' in line and '--init_from=resume' in line
    assert f'({newest} in {two_hosts.out})' in line
    assert not checkpoints.verify_own_files(str(two_hosts.disk['A'] / newest), 0)
    two_hosts.power_on('B')
    return newest


def test_a_signal_on_one_host_saves_both_and_they_resume_as_one(two_hosts, saved_run, tmp_path):
    """ZeRO-2, started as the README says (run_deepspeed_xl.sh on each node). A SIGTERM to host B's command
    (a scheduler pre-empting that node) saves both hosts' shards, each on its own disk, and both exit 0;
    export on one disk names the shards on the other. Resumed, then host B lost mid-training, then resumed
    again, the two hosts log what one host with two ranks logged (saved_run)."""
    args = [*SAVED_RUN, f'--out_dir={two_hosts.out}']
    a, b = two_hosts.start('A', args, script=True), two_hosts.start('B', args, script=True)
    wait_for(lambda: 'iter 1:' in output(a), 'iter 1 on host A', [a, b])
    b.send_signal(signal.SIGTERM)
    out_a, out_b = both_ok(a, b)
    assert 'node 1 of 2 (hostB, 1 rank(s)); 2 rank(s) in all: hostA (1), hostB (1)' in out_b
    stopped = re.search(r'SIGTERM: stopped after iter \d+ and saved \S+/(iter_(\d+));', out_a)
    assert stopped, out_a[-3000:]
    tag, saved_at = stopped.group(1), int(stopped.group(2))
    # each disk: its own rank's shard, and the model states (with the client state) to resume from
    disk_a, disk_b = (str(two_hosts.disk[h] / tag) for h in 'AB')
    assert checkpoints.files_of_rank(disk_a, 0) and not checkpoints.files_of_rank(disk_a, 1)
    assert sorted(checkpoints.shard_files(disk_b)) == ['mp_rank_00_model_states.pt',
                                                       'zero_pp_rank_1_mp_rank_00_optim_states.pt']
    assert checkpoints.latest_tag(str(two_hosts.disk['B'])) == tag

    # export on one disk names the shards on the other: it reads a copy of disk A as it is now, meanwhile
    # the hosts go on (the export's start-up fills the cores while host A waits for the lost host B)
    saved = tmp_path / 'diskA-saved'
    shutil.copytree(two_hosts.disk['A'], saved)
    export = subprocess.Popen([sys.executable, 'export.py', f'--out_dir={saved}'], cwd=REPO, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    resume = [*args, '--init_from=resume', f'--dist_timeout_s={LOST_AFTER_S}']
    a, b = two_hosts.start('A', resume), two_hosts.start('B', resume)
    training = saved_at + 2 + saved_at % 2  # after its log line, iter training + 1: no eval, no save
    lost_at = lose_host_b(two_hosts, a, b, lambda: f'iter {training}:' in output(a), f'iter {training}')
    said = export.communicate(timeout=120)[0]
    line = one_error(subprocess.CompletedProcess(export.args, export.returncode, said))
    assert 'zero_pp_rank_1_mp_rank_00_optim_states.pt from hostB' in line and 'rsync' in line
    out_a, _ = both_ok(two_hosts.start('A', resume), two_hosts.start('B', resume))
    assert f'resumed at iter {checkpoints.iter_number(lost_at)}' in out_a
    assert_same_run(saved_run[0], two_hosts.disk['A'], iters=10)


def test_a_host_lost_in_a_save_stops_the_other_and_both_resume_as_one(two_hosts, saved_run_zero3):
    """ZeRO-3 with gradient checkpointing (the recomputation gathers parameters across the hosts). Host B
    loses power while it saves iter_4: host A stops within dist_timeout_s with one line that names the newest
    checkpoint, iter_2, which stays complete; both resume from it and log what one host with two ranks logged
    (saved_run_zero3)."""
    args = [*SAVED_RUN, *ZERO3_CHECKPOINTING, f'--out_dir={two_hosts.out}',
            f'--dist_timeout_s={LOST_AFTER_S}']
    a, b = two_hosts.start('A', args), two_hosts.start('B', args)
    saving = two_hosts.disk['B'] / 'iter_4.partial'
    assert lose_host_b(two_hosts, a, b, saving.exists, 'host B saving iter_4') == 'iter_2'
    resume = [*args, '--init_from=resume']
    out_a, _ = both_ok(two_hosts.start('A', resume), two_hosts.start('B', resume))
    assert 'resumed at iter 2' in out_a
    assert_same_run(saved_run_zero3[0], two_hosts.disk['A'], iters=10)


# -----------------------------------------------------------------------------
# what a node checks before it launches (hosts.py), and what the ranks check when they meet

def test_a_node_checks_the_hostfile_its_slots_and_the_master(tmp_path, monkeypatch):
    hostfile = tmp_path / 'hostfile'
    hostfile.write_text('# two nodes\nnode1 slots=2\nnode2 slots=2\n')
    assert hosts.describe(str(hostfile)) == ('2 node(s), 4 rank(s), started over ssh by pdsh: node1 (2), '
                                             'node2 (2)')
    port = free_port()
    said = hosts.describe(str(hostfile), 0, '127.0.0.1', port, cpu=True)
    assert said.startswith('node 0 of 2 (node1, 2 rank(s)); 4 rank(s) in all')
    refusals = {
        'hostfile': (['node1 slots=two'], 0, '127.0.0.1', True),
        'node rank': (['node1 slots=1'], 1, '127.0.0.1', True),
        'slots': ([f'node1 slots={os.cpu_count() + 1}'], 0, '127.0.0.1', True),
        'GPUs': (['node1 slots=1'], 0, '127.0.0.1', False),
        'address': (['node1 slots=1', 'node2 slots=1'], 1, 'no-such-host.invalid', True),
        'not node 0': (['node1 slots=1'], 0, '192.0.2.1', True),
        'unreachable': (['node1 slots=1', 'node2 slots=1'], 1, '127.0.0.1', True),
    }
    fixes = {'hostfile': 'like "node1 slots=4"', 'node rank': 'its line number in the hostfile, 0 to 0',
             'slots': 'or fewer', 'GPUs': 'this node has no GPU', 'address': 'does not resolve',
             'not node 0': "this node's own address", 'unreachable': 'start node 0 too'}
    monkeypatch.setattr(hosts, 'MASTER_WAIT_S', 1)
    resolve = hosts.socket.getaddrinfo

    def no_dns(host, *args, **kwargs):  # a name that does not resolve, without asking a name server
        if host == 'no-such-host.invalid':
            raise hosts.socket.gaierror(-2, 'Name or service not known')
        return resolve(host, *args, **kwargs)
    monkeypatch.setattr(hosts.socket, 'getaddrinfo', no_dns)
    for case, (lines, node_rank, master_addr, cpu) in refusals.items():
        hostfile.write_text('\n'.join(lines) + '\n')
        with pytest.raises(ValueError, match=re.escape(fixes[case])):
            hosts.describe(str(hostfile), node_rank, master_addr, port, cpu=cpu)


def meet(rank, port, settings, out_dirs, results):
    """One rank of a 2-process gloo world: what the ranks agree on when they meet; then, in a process group
    made after the start (as DeepSpeed makes its own), how long rank 0 waits for a silent rank 1."""
    import torch
    import torch.distributed as dist

    from nanogpt_ds import ds_setup, preemption
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        ds_setup.check_same_settings(settings[rank])
        said = ''
    except ValueError as e:
        said = str(e)
    agreed = checkpoints.agree_on_tag(checkpoints.to_resume(out_dirs[rank]), 2)
    group = dist.new_group()
    preemption.stop_on_a_lost_rank(1, out_dirs[rank])
    waited_s, gave_up = 0.0, ''
    if rank == 0:
        start = time.time()
        try:
            dist.all_reduce(torch.ones(1), group=group)
        except RuntimeError as e:
            gave_up = str(e)
        waited_s = time.time() - start
    results.put((rank, said, agreed['tag'], agreed.get('note', ''), waited_s, gave_up))
    time.sleep(5 if rank else 0)  # silent, not gone: its connections stay open


def test_nodes_agree_on_settings_and_tag_and_give_up_on_a_silent_rank(saved_run, tmp_path):
    """Ranks started with other settings than rank 0's are named; nodes whose disks' newest tags differ (a
    save cut short on one) resume the newest that both have; once the loop starts, a collective in any
    process group waits dist_timeout_s for a silent rank, not torch's 30 minutes."""
    disks = [tmp_path / 'a', tmp_path / 'b']
    for disk in disks:
        shutil.copytree(saved_run[0], disk)
    shutil.rmtree(disks[1] / 'final')
    (disks[1] / 'latest').write_text('iter_8')
    settings = [{'max_iters': 10, 'out_dir': 'out'}, {'max_iters': 12, 'out_dir': 'out'}]
    ctx = multiprocessing.get_context('fork')
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=meet, args=(rank, port, settings, disks, results)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    seen = {rank: rest for rank, *rest in (results.get(timeout=60) for _ in procs)}
    for proc in procs:
        proc.join(timeout=30)
    for said, tag, note, _, _ in seen.values():
        assert 'max_iters=12 there, 10 on rank 0' in said and 'the same command line' in said
        assert tag == 'iter_8' and 'resuming iter_8, the newest on every node' in note
    _, _, _, waited_s, gave_up = seen[0]
    assert 'Timed out' in gave_up and 1 <= waited_s < 4, (waited_s, gave_up)
