"""Knowledge distillation (or plain fine-tuning) of a student from a teacher on calibration text: resumable, one process or many.

``kd_loss`` is the math: α·CE(student, labels) + (1−α)·T²·KL(softmax(teacher/T) ‖ softmax(student/T)), plus an
optional β·MSE between final hidden states. ``distill`` is the trainer: token blocks of the training-split
calibration text in a seeded order, AdamW with warmup + cosine, a JSONL loss log and a PNG curve, and an atomic
training checkpoint every ``save_every`` steps from which a killed run continues exactly (same losses, same weights).

Under ``torchrun --nproc_per_node=N`` every rank takes its shard of each global batch; gradients are summed with
one all-reduce and the loss is normalised by the token count of the *global* batch, so N processes make the same
update as one process on the whole batch. Only rank 0 writes files. The output folder holds::

    train_state.pt   student, optimizer, scheduler, RNG states, step, data cursor, run fingerprint
    loss.jsonl       one record per logged step (step, loss, ce, kl, hidden, lr, tokens)
    loss.png         the loss curve
    student/         the final student (models/checkpoint format; slimswarm.json has the distill config)
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import SlimswarmError
from ..models.llama import CausalLM
from ..progress import progress

STATE_FORMAT = "slimswarm-distill/1"
STATE_FILE = "train_state.pt"
LOG_FILE = "loss.jsonl"
PLOT_FILE = "loss.png"
STUDENT_DIR = "student"
MIN_LR_RATIO = 0.1  # cosine decays to this fraction of lr, not to zero, so the last steps still learn
# Strings two tokenizers must encode alike to count as the same (ASCII, digits, newline, accents, CJK).
TOKENIZER_PROBES = (
    "Hello, world!",
    "The quick brown fox jumps over 13 lazy dogs.",
    "Question: 2+2=?\nAnswer: 4",
    " naïve café 東京",
)


class DistillConfig(BaseModel):
    """One distillation run. ``batch_size`` is the global batch: ranks split it evenly."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["kd", "ce"] = "kd"  # ce: plain fine-tuning on the text (α=1, no teacher forward)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the hard-label cross-entropy
    temperature: float = Field(2.0, gt=0)
    beta_hidden: float = Field(0.0, ge=0)  # weight of the final-hidden-state MSE (kd mode only)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(256, ge=2)
    lr: float = Field(3e-4, gt=0)
    warmup: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0: no clipping
    save_every: int = Field(50, ge=0)  # 0: a training checkpoint only at the end
    seed: int = 0
    log_every: int = Field(1, ge=1)  # one loss.jsonl record every this many steps (and the last)


# -- the math ---------------------------------------------------------------------------------------


def kd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
             T: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-batch *sums* over non-ignored tokens: (cross-entropy, KL(teacher_T ‖ student_T), token count).

    Sums, not means, so data-parallel ranks can normalise by the global token count."""
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v).float()
    y = labels.reshape(-1)
    keep = y != -100
    n = keep.sum()
    ce = F.cross_entropy(s, y, ignore_index=-100, reduction="sum")
    if teacher_logits is None:
        return ce, s.new_zeros(()), n
    if teacher_logits.shape != student_logits.shape:
        raise SlimswarmError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                             f"{tuple(student_logits.shape)} differ in shape")
    t = teacher_logits.reshape(-1, v).float()
    log_ps = F.log_softmax(s[keep] / T, dim=-1)
    log_pt = F.log_softmax(t[keep] / T, dim=-1)
    kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum")  # Σ p_t (log p_t − log p_s)
    return ce, kl, n


def hidden_mse_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, labels: torch.Tensor,
                   proj: nn.Module | None = None) -> torch.Tensor:
    """Σ over non-ignored tokens of mean-over-width (proj(h_student) − h_teacher)²."""
    h = student_hidden if proj is None else proj(student_hidden)
    if h.shape != teacher_hidden.shape:
        raise SlimswarmError(f"student hidden width {student_hidden.shape[-1]} ≠ teacher's {teacher_hidden.shape[-1]}: "
                             "pass a projection")
    keep = (labels != -100).unsqueeze(-1)
    d = (h.float() - teacher_hidden.float()) ** 2
    return (d * keep).sum() / h.shape[-1]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
            alpha: float, T: float, *, student_hidden: torch.Tensor | None = None,
            teacher_hidden: torch.Tensor | None = None, proj: nn.Module | None = None, beta: float = 0.0,
            num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """α·CE + (1−α)·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) [+ β·hidden MSE], mean over tokens whose
    label is not -100. ``num_tokens`` overrides the denominator (the global count under data parallelism)."""
    if teacher_logits is None and alpha != 1:
        raise SlimswarmError(f"kd_loss: alpha={alpha} needs teacher logits (only alpha=1 is plain cross-entropy)")
    ce, kl, n = kd_terms(student_logits, teacher_logits, labels, T)
    total = alpha * ce + (1 - alpha) * T * T * kl
    if beta:
        if student_hidden is None or teacher_hidden is None:
            raise SlimswarmError("kd_loss: beta > 0 needs student_hidden and teacher_hidden")
        total = total + beta * hidden_mse_sum(student_hidden, teacher_hidden, labels, proj)
    denom = n if num_tokens is None else num_tokens
    return total / torch.as_tensor(denom, device=total.device).clamp_min(1)


# -- students, tokenizers, identities ------------------------------------------------------------------


def drop_layers(model: CausalLM, keep: list[int]) -> CausalLM:
    """A new, smaller model holding a copy of ``model`` with only the decoder layers ``keep`` (a student init)."""
    n = model.config.num_hidden_layers
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise SlimswarmError(f"keep={keep}: need distinct layer indices in 0..{n - 1}")
    out = copy.deepcopy(model)
    out.model.layers = nn.ModuleList(out.model.layers[i] for i in keep)
    cfg = out.config = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep)
    for name in ("layer_kv_heads", "layer_intermediate"):
        v = getattr(cfg, name)
        if v is not None:
            setattr(cfg, name, [v[i] for i in keep])
    return out


def check_same_tokenizer(teacher_tok, student_tok) -> None:
    """SlimswarmError unless both tokenizers have the same vocabulary size and encode the probe strings alike."""
    if teacher_tok.vocab_size != student_tok.vocab_size:
        raise SlimswarmError(f"student tokenizer has {student_tok.vocab_size} tokens, teacher's {teacher_tok.vocab_size}: "
                             "distillation needs the same tokenizer")
    for p in TOKENIZER_PROBES:
        if teacher_tok.encode(p) != student_tok.encode(p):
            raise SlimswarmError(f"student and teacher tokenizers encode {p!r} differently: "
                                 "distillation needs the same tokenizer")


def state_hash(model: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, bytes): the identity of its weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def run_fingerprint(cfg: DistillConfig, teacher_hash: str | None, student_hash: str, data_hash: str) -> str:
    """What makes a run itself: everything that changes its trajectory (not save_every, log_every or world size)."""
    doc = {"format": STATE_FORMAT, "config": cfg.model_dump(exclude={"save_every", "log_every"}),
           "teacher": teacher_hash, "student": student_hash, "data": data_hash}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


# -- data ------------------------------------------------------------------------------------------


class TokenBlocks:
    """Non-overlapping ``seq_len`` blocks of one token stream (labels: the next tokens), in a seeded order.

    Sample ``k`` of the run is a pure function of ``(seed, k)``: each epoch is a fresh permutation, so the
    data cursor of a checkpoint is just the number of samples consumed."""

    def __init__(self, ids: list[int], seq_len: int, seed: int):
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.seq_len, self.seed = seq_len, seed
        self.n = (len(ids) - 1) // seq_len
        if self.n < 1:
            raise SlimswarmError(f"training text: {len(ids)} tokens, one block needs seq_len + 1 = {seq_len + 1}")
        self._perm: dict[int, torch.Tensor] = {}

    def block(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if epoch not in self._perm:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = {epoch: torch.randperm(self.n, generator=g)}
        return int(self._perm[epoch][pos])

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) [count, seq_len] for samples ``first .. first+count-1``."""
        starts = [self.block(k) * self.seq_len for k in range(first, first + count)]
        rows = torch.stack([self.ids[s : s + self.seq_len + 1] for s in starts])
        return rows[:, :-1], rows[:, 1:]


# -- distributed -----------------------------------------------------------------------------------


def distributed_device() -> torch.device:
    """The device this rank should put its models on: cuda:LOCAL_RANK where CUDA exists, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _dist_setup(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether we created the process group). torchrun sets WORLD_SIZE and friends."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sum gradients over ranks in one flat buffer (each rank's loss is already divided by the global count)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    i = 0
    for p in params:
        n = p.numel()
        p.grad = flat[i : i + n].view_as(p).clone()
        i += n


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


# -- files -----------------------------------------------------------------------------------------


def _atomic_torch_save(obj, path: Path) -> None:
    from ..atomic import write_file

    write_file(path, lambda f: torch.save(obj, f))


def _atomic_write_text(path: Path, text: str) -> None:
    from ..atomic import write_file

    write_file(path, lambda f: f.write(text.encode()))


def loss_plot(history: list[dict], path: Path, title: str) -> Path:
    """The loss curve (total, and its CE / KL parts where present) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in history], label="loss")
    if all("ce" in r for r in history):  # distillation records; LoRA fine-tuning logs the loss (and its EMA)
        ax.plot(steps, [r["ce"] for r in history], label="cross-entropy", alpha=0.6)
    if all("loss_ema" in r for r in history):
        ax.plot(steps, [r["loss_ema"] for r in history], label="loss (moving average)", alpha=0.6)
    if any(r.get("kl") for r in history):
        ax.plot(steps, [r["kl"] for r in history], label="KL (teacher ‖ student, at T)", alpha=0.6)
    if any(r.get("hidden") for r in history):
        ax.plot(steps, [r["hidden"] for r in history], label="hidden MSE", alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("per-token loss")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    from ..atomic import write_file

    try:
        write_file(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path


def _rng_state() -> dict:
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import numpy as np

    torch.set_rng_state(st["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in st["python"]))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _load_state(path: Path, fingerprint: str, device: torch.device) -> dict:
    try:
        st = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise SlimswarmError(f"{path}: unreadable training checkpoint ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
        raise SlimswarmError(f"{path}: not a slimswarm distill checkpoint")
    if st["fingerprint"] != fingerprint:
        raise SlimswarmError(f"{path}: checkpoint of a different run (fingerprint {st['fingerprint']} ≠ {fingerprint}: "
                             "config, teacher, student or text changed); use another output folder or resume=False")
    return st


# -- the trainer -----------------------------------------------------------------------------------


@dataclass
class DistillResult:
    student_dir: Path | None  # None on ranks other than 0
    history: list[dict] = field(default_factory=list)  # loss.jsonl records
    resumed_from: int = 0  # the step the run continued from (0: a fresh start)


def warmup_cosine(warmup: int, steps: int, floor: float = MIN_LR_RATIO) -> Callable[[int], float]:
    """The learning-rate factor at a step: linear warmup over ``warmup`` steps, then a cosine from 1 down to
    ``floor`` at ``steps`` (held there after). Distillation and LoRA fine-tuning share it."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def distill(teacher: CausalLM | None, student: CausalLM, tokenizer, cfg: DistillConfig, out_dir: str | Path,
            text: str | None = None, resume: bool = True, *, student_tokenizer=None, meta: dict | None = None,
            on_step: Callable[[dict], None] | None = None, save: bool = True) -> DistillResult:
    """Train ``student`` (in place) towards ``teacher`` on ``text`` (default: the training-split calibration text).

    ``tokenizer`` is the teacher's; ``student_tokenizer`` (default: the same) must match it. With ``resume`` an
    existing ``out_dir/train_state.pt`` of the same run is continued exactly; one of another run is an error and
    nothing is overwritten. ``meta`` joins the final checkpoint's slimswarm.json; ``on_step(record)`` is called after
    every step (after any checkpoint of that step). ``save=False`` (a recipe's recovery pass) writes only the loss log:
no training checkpoints and no student folder. Works as it is under torchrun (one process a rank)."""
    from .calibrate import default_calibration_text

    kd = cfg.mode == "kd"
    if kd and teacher is None:
        raise SlimswarmError("distill: mode 'kd' needs a teacher (mode 'ce' fine-tunes without one)")
    device = student.device
    if kd and teacher.device != device:
        raise SlimswarmError(f"teacher is on {teacher.device}, student on {device}: put both on one device")
    if kd and teacher.config.vocab_size != student.config.vocab_size:
        raise SlimswarmError(f"student vocabulary {student.config.vocab_size} ≠ teacher's {teacher.config.vocab_size}: "
                             "distillation needs the same tokenizer")
    if student_tokenizer is not None:
        check_same_tokenizer(tokenizer, student_tokenizer)
    student_tokenizer = student_tokenizer or tokenizer
    use_hidden = kd and cfg.beta_hidden > 0
    alpha = cfg.alpha if kd else 1.0
    teacher_forward = kd and (alpha < 1 or use_hidden)

    rank, world, own_group = _dist_setup(device)
    try:
        if cfg.batch_size % world:
            raise SlimswarmError(f"batch_size {cfg.batch_size} is not a multiple of the {world} processes")
        local = cfg.batch_size // world

        ids = tokenizer.encode(default_calibration_text() if text is None else text)
        data = TokenBlocks(ids, cfg.seq_len, cfg.seed)
        data_hash = hashlib.sha256(data.ids.numpy().tobytes()).hexdigest()
        teacher_hash = state_hash(teacher) if kd else None
        fingerprint = run_fingerprint(cfg, teacher_hash, state_hash(student), data_hash)

        out = Path(out_dir)
        state_path = out / STATE_FILE
        st = _load_state(state_path, fingerprint, device) if resume and state_path.exists() else None

        # Everything the run trains: the student and, for hidden matching across widths, a projection.
        torch.manual_seed(cfg.seed)
        proj = None
        if use_hidden and student.config.hidden_size != teacher.config.hidden_size:
            proj = nn.Linear(student.config.hidden_size, teacher.config.hidden_size, bias=False).to(device, student.dtype)
        for m in (teacher, student):
            if m is not None:
                m.clear_cache()  # full-sequence forwards: no KV cache
        params = list({id(p): p for p in student.parameters() if p.requires_grad}.values())
        extra = list(proj.parameters()) if proj is not None else []
        decay = [p for p in params + extra if p.dim() >= 2]
        no_decay = [p for p in params + extra if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps))
        history: list[dict] = []
        start = 0
        if st is not None:
            student.load_state_dict(st["student"])
            if proj is not None:
                proj.load_state_dict(st["proj"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            _set_rng_state(st["rng"])
            start, history = st["step"], list(st["history"])
            if st["cursor"] != start * cfg.batch_size:
                raise SlimswarmError(f"{state_path}: data cursor {st['cursor']} does not match step {start}")
        elif world > 1:
            import torch.distributed as dist

            for p in params + extra:  # one starting point on every rank
                dist.broadcast(p.data, 0)

        def save_state(step: int) -> None:
            _atomic_torch_save({
                "format": STATE_FORMAT, "fingerprint": fingerprint, "step": step, "cursor": step * cfg.batch_size,
                "config": cfg.model_dump(), "teacher": teacher_hash, "world_size": world,
                "student": student.state_dict(), "proj": proj.state_dict() if proj is not None else None,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(),
                "history": history,
            }, state_path)
            loss_plot(history, out / PLOT_FILE, f"distill ({cfg.mode}) step {step}/{cfg.steps}")

        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            # The log restarts from the checkpoint: steps a killed run logged after it are recomputed.
            _atomic_write_text(out / LOG_FILE, "".join(json.dumps(r) + "\n" for r in history))

        if teacher is not None:
            teacher.eval()
        student.train()
        steps = range(start, cfg.steps)
        for step in progress(steps, f"distill ({cfg.mode})", total=len(steps)) if rank == 0 else steps:
            first = step * cfg.batch_size + rank * local
            x, y = (t.to(device) for t in data.batch(first, local))
            n_global = _all_reduce((y != -100).sum(), world)
            h_s = student(x, hidden_only=True)
            logits_s = student.lm_head(h_s)
            logits_t = h_t = None
            if teacher_forward:
                with torch.no_grad():
                    h_t = teacher(x, hidden_only=True)
                    logits_t = teacher.lm_head(h_t) if alpha < 1 else None
            ce, kl, _ = kd_terms(logits_s, logits_t, y, cfg.temperature)
            hid = hidden_mse_sum(h_s, h_t, y, proj) if use_hidden else ce.new_zeros(())
            total = alpha * ce + (1 - alpha) * cfg.temperature ** 2 * kl + cfg.beta_hidden * hid
            (total / n_global).backward()
            if world > 1:
                _all_reduce_grads(params + extra)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params + extra, cfg.grad_clip)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

            sums = _all_reduce(torch.stack([total, ce, kl, hid]).detach().double(), world) / n_global.double()
            done = step + 1
            rec = {"step": done, "loss": sums[0].item(), "ce": sums[1].item(), "kl": sums[2].item(),
                   "hidden": sums[3].item(), "lr": lr, "tokens": int(n_global)}
            if done % cfg.log_every == 0 or done == cfg.steps:
                history.append(rec)
                if rank == 0:
                    with open(out / LOG_FILE, "a") as f:
                        f.write(json.dumps(rec) + "\n")
            if rank == 0 and save and ((cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps):
                save_state(done)
            if on_step is not None:
                on_step(rec)

        student.eval()
        student_dir = None
        if rank == 0 and save:
            from ..models.checkpoint import save_checkpoint

            if not (out / PLOT_FILE).exists() and history:
                loss_plot(history, out / PLOT_FILE, f"distill ({cfg.mode}) step {cfg.steps}/{cfg.steps}")
            info = {"config": cfg.model_dump(), "teacher": {"weights_sha256": teacher_hash}, "fingerprint": fingerprint,
                    "final_loss": history[-1]["loss"] if history else None}
            student_dir = save_checkpoint(student, student_tokenizer, out / STUDENT_DIR,
                                          {**(meta or {}), "distill": info}, overwrite=True)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # no rank leaves (and tears the group down) before rank 0 has written
        return DistillResult(student_dir, history, start)
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
