"""
Pre-emption for train_deepspeed.py: the first SIGTERM or SIGINT (a scheduler's notice, Ctrl-C) only raises a flag;
the loop finishes its optimizer step, every rank saves, and the run exits 0. A second signal exits at once.
"""
import os
import signal
import time

# DeepSpeed's launcher, signalled with its ranks (Ctrl-C in a terminal, a kill of the process group), forwards a
# copy of the same notice to each rank at once: one arriving this soon after the first is not a second signal
SAME_NOTICE_S = 2.0


class StopFlag:
    def __init__(self):
        self.signal_name, self.at = None, None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)

    def on_signal(self, signum, frame):
        if self.signal_name is None:
            self.signal_name, self.at = signal.Signals(signum).name, time.time()
        elif time.time() - self.at > SAME_NOTICE_S:
            os._exit(128 + signum)

    def __bool__(self):
        return self.signal_name is not None
