"""Test-only pieces for fault tests that run `python -m amzft fit` in a subprocess: callbacks
given on the command line (``--trainer.callbacks+=...``; this folder is put on PYTHONPATH) that
record per-step losses or make the process hang at a known point so the test can SIGKILL it
there, and a guard that makes any non-loopback network access fail."""

from __future__ import annotations

import io
import json
import os
import socket
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback


class RecordLosses(Callback):
    """Append {"step", "loss"} to a JSON Lines file after every optimizer step (flushed, so a
    SIGKILL loses nothing already written)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not trainer.is_global_zero:
            return
        if step != self._last and "train/loss" in trainer.callback_metrics:
            self._last = step
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "loss": float(trainer.callback_metrics["train/loss"])}) + "\n")


class HangAtStep(Callback):
    """After optimizer step ``step`` (and its checkpoint, if one is due: checkpoint callbacks
    run at the end of that batch), write ``marker`` at the next batch start and sleep: the
    test kills the process there."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            self.marker.write_text(str(trainer.global_step))
            time.sleep(3600)


class HangWhileWriting(Callback):
    """From optimizer step ``step`` on, the next write of ``last.ckpt`` puts half its bytes into
    the temporary file, writes ``marker`` and sleeps: the test kills the process mid-write."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, Path(marker)

    def setup(self, trainer, pl_module, stage):
        real_save = torch.save
        helper = self

        def save(obj, f, *args, **kwargs):
            # atomic_torch_save writes through os.fdopen, whose .name is the descriptor number
            name = os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else str(f)
            if ".last.ckpt." in str(name) and trainer.global_step >= helper.step:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                helper.marker.write_text(f"{trainer.global_step} {name}")
                time.sleep(3600)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save


class NetworkAccess(RuntimeError):
    pass


def _is_local(host) -> bool:
    if host is None:
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    return host in ("localhost", "", "::1", "0.0.0.0") or host.startswith("127.")


ATTEMPTS: list[str] = []


def block_network() -> list[str]:
    """Make every attempt to reach a non-loopback host raise ``NetworkAccess`` (loopback stays
    open for DDP's gloo rendezvous). Returns the list that records the attempts."""
    attempts = ATTEMPTS
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def check(address):
        if isinstance(address, tuple) and not _is_local(address[0]):
            attempts.append(str(address))
            raise NetworkAccess(f"amzft tried to reach the network: {address}")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            attempts.append(f"getaddrinfo {host}")
            raise NetworkAccess(f"amzft tried to resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
    return attempts


class OutOfMemoryAt(Callback):
    """Raise torch's CUDA out-of-memory error in the backward of the first micro-batch of optimizer
    step ``step`` (as a GPU does on a too-long example or too large a batch)."""

    def __init__(self, step: int):
        self.step = step

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step + 1 >= self.step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total)")


class SlowLastWrite(Callback):
    """From optimizer step ``step`` on, each write of ``last.ckpt`` writes ``marker`` once half its
    bytes are in the temporary file, then waits ``seconds`` before writing the rest: a write long
    enough for a test to signal the process during it."""

    def __init__(self, step: int, marker: str, seconds: float):
        self.step, self.marker, self.seconds = step, Path(marker), seconds

    def setup(self, trainer, pl_module, stage):
        real_save, helper = torch.save, self

        def save(obj, f, *args, **kwargs):
            name = os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else str(f)
            if ".last.ckpt." not in str(name) or trainer.global_step < helper.step:
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            helper.marker.write_text(str(trainer.global_step))
            time.sleep(helper.seconds)
            f.write(data[len(data) // 2:])

        torch.save = save
