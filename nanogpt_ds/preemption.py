"""
Pre-emption for train_deepspeed.py: the first SIGTERM or SIGINT (a scheduler's notice, Ctrl-C) only raises a
flag; the loop finishes its optimizer step, every rank saves, and the run exits 0. A second signal exits at
once.

A signal to the `deepspeed` command itself (a container's PID 1, a batch system's notice) reaches no rank:
DeepSpeed's single-node runner dies of it and leaves its launch.py and the ranks running. So each rank also
watches its launcher and the runner above it; when either is gone, that counts as the first signal. A signal
on one node stops every node's ranks: they agree on stopping at every iteration.

A rank that is gone without a word (its node lost power, its process was killed) cannot save with the others:
a collective that waits dist_timeout_s for it ends the run with one line on each node, and the newest
checkpoint stays the one to resume.
"""
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

from nanogpt_ds import checkpoints

# DeepSpeed's launcher, signalled with its ranks (Ctrl-C in a terminal, a kill of the process group),
# forwards a copy of the same notice to each rank at once: one arriving this soon after the first is not a
# second signal
SAME_NOTICE_S = 2.0
WATCH_EVERY_S = 1.0  # how often a rank looks for its launcher and runner
# what a rank can have seen, numbered so that the ranks agree on one with a MAX all_reduce (the runner's end
# outranks the rest: each rank's watcher sees it on its own second, and rank 0 says what happened)
REASONS = (None, 'SIGINT', 'SIGTERM', "the end of DeepSpeed's launch.py", 'the end of the deepspeed command')


# what gloo says when a peer is gone: its socket reset or closed, or no answer within the timeout
GLOO_LOST_PEER = ('third_party/gloo', 'caused pair closure')


class StopFlag:
    def __init__(self, on_gpu, dist_timeout_s, out_dir):
        """The loop's watch: signals, the launcher and runner, and (stop_on_a_lost_rank) ranks lost."""
        timeout_s = dist_timeout_s or (600 if on_gpu else 120)
        stop_on_a_lost_rank(timeout_s, out_dir)
        # the flag travels on the CPU (gloo) even beside NCCL: agreeing on it is no GPU sync
        self.group = dist.new_group(backend='gloo', timeout=timedelta(seconds=timeout_s)) if on_gpu else None
        self.signal_name, self.at = None, None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        launcher, runner = deepspeed_launcher_and_runner()
        if launcher:
            threading.Thread(target=self.watch, args=(launcher, runner), daemon=True).start()

    def on_signal(self, signum, frame):
        if self.signal_name is None:
            self.signal_name, self.at = signal.Signals(signum).name, time.time()
        elif time.time() - self.at > SAME_NOTICE_S:
            os._exit(128 + signum)

    def watch(self, launcher, runner):
        while self.signal_name is None:
            time.sleep(WATCH_EVERY_S)
            if os.getppid() != launcher.pid:
                self.signal_name = "the end of DeepSpeed's launch.py"
            elif runner and not alive_parent_of(launcher, runner):
                self.signal_name = 'the end of the deepspeed command'
        self.at = self.at or time.time()

    def __bool__(self):
        return self.signal_name is not None

    def anywhere(self):
        """What any rank has seen (a name from REASONS), None when no rank has. Collective: the ranks agree on
        where to stop and why."""
        seen = torch.tensor(REASONS.index(self.signal_name))
        dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=self.group)
        return REASONS[seen.item()]


def deepspeed_launcher_and_runner():
    """(this rank's launch.py, the deepspeed runner that started it) as psutil processes, (None, None) when
    not started by DeepSpeed's launcher (a plain `python train_deepspeed.py`, torchrun)."""
    try:
        launcher = psutil.Process().parent()
        if launcher is None or 'deepspeed.launcher.launch' not in ' '.join(launcher.cmdline()):
            return None, None
        runner = launcher.parent()
        runner_is_deepspeed = runner is not None and 'deepspeed' in ' '.join(runner.cmdline())
        return launcher, runner if runner_is_deepspeed else None
    except psutil.Error:
        return None, None


def alive_parent_of(launcher, runner):
    try:
        return runner.is_running() and launcher.ppid() == runner.pid
    except psutil.Error:
        return False


def stop_on_a_lost_rank(timeout_s, out_dir):
    """From here on a collective in any process group waits timeout_s for every rank, not the start-up's
    minutes (ds_setup) nor torch's 30 for the groups DeepSpeed makes, and a rank whose collective fails
    because a peer is gone ends with one line (the first rank of each node says it) and exit 1, not a
    traceback; the launcher then stops the node's other ranks. StopFlag's default: on CPU 120 s (a collective
    there waits seconds for the slowest rank); with GPUs 600 s, NCCL's own default, which a first compilation
    or a save of gpt2-xl to a slow disk may need."""
    c10d = dist.distributed_c10d
    for group in list(c10d._world.pg_map):  # DeepSpeed's own groups too (ZeRO's gradients travel there)
        c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)
    python_hook = sys.excepthook

    def hook(kind, error, trace):
        text = str(error)
        lost = isinstance(error, dist.DistError) or any(mark in text for mark in GLOO_LOST_PEER)
        if not lost:
            return python_hook(kind, error, trace)
        if int(os.environ.get('LOCAL_RANK', '0')) == 0:
            newest = checkpoints.latest_tag(out_dir) or 'none yet'
            reason = text.splitlines()[0].split('] ')[-1][:160] if text else kind.__name__
            print(f'error: rank {dist.get_rank()} on {socket.gethostname()} lost another rank ({reason}; '
                  f'dist_timeout_s={timeout_s:g}): a node down or its processes killed. Nothing was saved '
                  f'after this node\'s newest checkpoint ({newest} in {out_dir}); once every node is back, '
                  f'start every node again with --init_from=resume', file=sys.stderr, flush=True)
        os._exit(1)
    sys.excepthook = hook
