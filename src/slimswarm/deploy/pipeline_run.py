"""deploy/: run a pipeline split: one process per stage on loopback TCP, each holding its decoder layers (the first
also the embedding, the last the final norm and head) and the KV cache of those layers only; hidden states flow
stage to stage and the last stage's logits come back to the caller."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

import torch
from torch import nn

from ..models.llama import KVCache



class Stage(nn.Module):
    """Decoder layers [lo, hi) of a CausalLM, with the embedding on the first stage and norm + head on the last."""

    def __init__(self, model, lo: int, hi: int, first: bool | None = None, last: bool | None = None):
        super().__init__()
        n = model.config.num_hidden_layers
        # A stage may hold no decoder layer (the DP may give the embedding or the head a device of its own), so the
        # caller says which stage is first and last.
        self.first = lo == 0 if first is None else first
        self.last = hi == n if last is None else last
        self.lo, self.hi = lo, hi
        self.layers = nn.ModuleList(model.model.layers[lo:hi])
        self.embed = model.model.embed_tokens if self.first else None
        self.norm = model.model.norm if self.last else None
        self.head = model.lm_head if self.last else None
        self.register_buffer("inv_freq", model.inv_freq.clone(), persistent=False)
        self.cache_len = 0

    def setup_cache(self, batch: int, max_len: int, dtype=torch.float32) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for layer in self.layers:
                a = layer.self_attn
                a.cache = KVCache(batch, a.n_kv, max_len, a.head_dim, dtype, "cpu")
        self.cache_len = max_len

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.self_attn.cache is not None
                   for t in layer.self_attn.cache.slot_tensors())

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Tokens [B, T] (first stage) or hidden states [B, T, H] written at cache slots start..start+T-1."""
        h = self.embed(x) if self.first else x
        b, t = h.shape[:2]
        slots = start + torch.arange(t)
        kv_len = start + t
        freqs = slots.to(torch.float32)[None, :, None].expand(b, t, 1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        mask = None
        if t > 1 and kv_len != t:  # a chunk after earlier slots: causal over the whole cache
            j = torch.arange(kv_len)
            mask = (j[None, None, :] <= slots[None, :, None]).expand(b, t, kv_len)[:, None]
        for layer in self.layers:
            h = layer(h, cos, sin, start, mask, kv_len, 0)
        if self.last:
            return self.head(self.norm(h))
        return h


def _stage_main(downstream, report, threads: int, auth: bytes) -> None:
    torch.set_num_threads(threads)
    stage: Stage = report.recv()  # from the parent, over this stage's private pipe (never from a file)
    lis = Listener(("127.0.0.1", 0), authkey=auth)
    report.send(lis.address)
    down = Client(downstream, authkey=auth)
    up = lis.accept()
    while True:
        msg = up.recv()
        kind = msg[0]
        if kind == "setup":
            stage.setup_cache(msg[1], msg[2])
            down.send(("setup", msg[1], msg[2], *msg[3:], stage.kv_bytes()))
        elif kind == "fwd":
            t = time.perf_counter()
            out = stage(msg[1], msg[2])
            down.send(("fwd", out, msg[2], msg[3] + [time.perf_counter() - t]))
        else:
            down.send(msg)
            break
    down.close()
    up.close()


class PipelineRunner:
    """Stages of ``model`` split at ``ranges`` ([lo, hi) decoder layers each), one process each on 127.0.0.1.

    ``forward(tokens, start)`` returns the last stage's logits and records per-call compute and wall times, so the
    per-hop overhead (serialisation + loopback transfer) is wall − compute over the hops."""

    def __init__(self, model, ranges: list[tuple[int, int]], threads: int = 1):
        n = model.config.num_hidden_layers
        if (not ranges or ranges[0][0] != 0 or ranges[-1][1] != n or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:]))
                or any(lo > hi for lo, hi in ranges)):
            raise ValueError(f"stage ranges must cover layers 0..{n} contiguously, got {ranges}")
        self.ranges = ranges
        # forkserver: one clean server process imports torch once and forks each stage from it (spawn would import
        # torch again per stage; a plain fork would copy this process's threads and its whole model)
        ctx = mp.get_context("forkserver")
        root = str(Path(__file__).resolve().parents[2])  # the server is a fresh interpreter: let it find slimswarm
        if root not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)
        ctx.set_forkserver_preload(["torch", "slimswarm.deploy.pipeline_run"])
        # a fresh secret per pipeline: the stages' loopback sockets carry pickled messages, so only they may connect
        self._auth = os.urandom(32)
        self._ret = Listener(("127.0.0.1", 0), authkey=self._auth)
        got: dict = {}
        acc = threading.Thread(target=lambda: got.setdefault("c", self._ret.accept()), daemon=True)
        acc.start()
        self.procs = []
        downstream = self._ret.address
        for k in reversed(range(len(ranges))):  # from the last stage back, so each knows where to send
            lo, hi = ranges[k]
            a, b = ctx.Pipe()
            proc = ctx.Process(target=_stage_main, args=(downstream, b, threads, self._auth), daemon=True)
            proc.start()
            a.send(Stage(model, lo, hi, first=k == 0, last=k == len(ranges) - 1))
            if not a.poll(300):  # a stage that dies while starting must not leave the caller waiting forever
                for q in self.procs + [proc]:
                    q.kill()
                raise RuntimeError(f"pipeline stage {k} (layers {lo}-{hi}) did not start (exit code {proc.exitcode})")
            downstream = a.recv()
            self.procs.append(proc)
        self._to_first = Client(downstream, authkey=self._auth)
        acc.join(60)
        self._from_last = got["c"]
        self.stats: list[dict] = []

    def setup_cache(self, batch: int, max_len: int) -> list[int]:
        """KV caches on every stage; returns each stage's KV bytes (each holds only its layers' slice)."""
        self._to_first.send(("setup", batch, max_len))
        msg = self._from_last.recv()
        return list(msg[3:])

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        t = time.perf_counter()
        self._to_first.send(("fwd", x, start, []))
        _, out, _, compute = self._from_last.recv()
        wall = time.perf_counter() - t
        self.stats.append({"tokens": x.shape[1], "wall_s": wall, "compute_s": sum(compute),
                           "hops": len(self.ranges) + 1})
        return out

    def per_hop_overhead_s(self, decode_only: bool = True) -> float:
        """Median over calls of (wall − compute) / hops (driver→stage0, between stages, last→driver)."""
        import statistics

        rows = [s for s in self.stats if not decode_only or s["tokens"] == 1] or self.stats
        return statistics.median((s["wall_s"] - s["compute_s"]) / s["hops"] for s in rows)

    def close(self) -> None:
        try:
            self._to_first.send(("stop",))
            self._from_last.recv()
        except (OSError, EOFError):
            pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        self._ret.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
