"""A Lightning callback for benchmarks/first_step.py: prints when each stage of ``fit`` begins (wall
clock, CPU seconds, peak RSS) and, once the first optimizer step has run, ends the process (the
rest of the run is not measured)."""

from __future__ import annotations

import os
import time

from lightning.pytorch.callbacks import Callback

MARK = "AMZFT_MARK"


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def mark(stage: str) -> None:
    t = os.times()  # the build's worker processes count once they have been joined
    cpu = t.user + t.system + t.children_user + t.children_system
    print(f"\n{MARK} {stage} {time.time():.3f} {cpu:.1f} {peak_rss_mib():.0f}", flush=True)


class FirstStepProbe(Callback):
    def setup(self, trainer, pl_module, stage: str) -> None:
        mark("setup")  # the model is loaded; the data is prepared next

    def on_train_start(self, trainer, pl_module) -> None:
        mark("train_start")  # data ready, optimizer made

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= 1:
            mark("first_step")
            os._exit(0)
