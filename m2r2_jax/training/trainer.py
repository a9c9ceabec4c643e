"""The training loop: data (self-distilled), sharded state, resumable Orbax
checkpoints, tqdm progress, TensorBoard + JSONL metrics."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from m2r2_jax.data.batches import BatchStream, pack_examples
from m2r2_jax.errors import M2R2Error
from m2r2_jax.m2r2.params import init_m2r2
from m2r2_jax.model.params import count_params
from m2r2_jax.sharding import make_mesh, maybe_initialize_distributed
from m2r2_jax.training import checkpoint as C
from m2r2_jax.training.config import TrainConfig, config_to_dict
from m2r2_jax.training.metrics import Tracker
from m2r2_jax.training.step import init_opt_state, lr_schedule, make_optimizer, make_train_step, train_shardings


def rank_draft_vocab(records: Sequence[dict], vocab_size: int, n: int, always: Sequence[int] = ()) -> np.ndarray:
    """The n most frequent answer tokens (ties by id), plus `always` (EOS); sorted ids."""
    if n <= 0 or n >= vocab_size:
        return np.arange(vocab_size, dtype=np.int32)
    counts = collections.Counter()
    for r in records:
        counts.update(r["answer_ids"])
    for t in always:
        counts[t] += 10**9
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    ids = [t for t, _ in ranked]
    if len(ids) < n:  # pad with the lowest unused ids so the shape is static
        used = set(ids)
        ids += [i for i in range(vocab_size) if i not in used][: n - len(ids)]
    return np.asarray(sorted(ids), np.int32)


def distilled_records(tc: TrainConfig, model, progress: bool = True) -> list[dict]:
    from m2r2_jax.data.prompts import default_train_sources, load_prompts
    from m2r2_jax.training.distill import as_distill_model, build_distill_cache
    from m2r2_jax.training.distill_pack import restore_cache, sync_pack

    d = tc.data
    sources = list(d.sources) or default_train_sources()
    prompts = load_prompts(sources, limit=d.num_prompts + d.heldout_prompts, seed=d.seed)
    train_prompts = prompts[: len(prompts) - d.heldout_prompts] if d.heldout_prompts else prompts
    on_shard = None
    if d.distill_model and d.distill_model != tc.model:
        from m2r2_jax.loading.registry import load_model

        vocab = model.cfg.vocab_size
        model = load_model(d.distill_model)
        if model.cfg.vocab_size != vocab:
            raise M2R2Error(
                f"data.distill_model={d.distill_model!r} has a vocabulary of {model.cfg.vocab_size}, the trained "
                f"model {tc.model!r} {vocab}: its answers are not the trained model's tokens"
            )
    if d.distill_pack:
        model = as_distill_model(model)
        restore_cache(d.distill_pack, d.distill_dir, train_prompts, model.encode)
        on_shard = lambda: sync_pack(d.distill_dir, d.distill_pack)  # noqa: E731
    ds = build_distill_cache(
        model,
        train_prompts,
        d.distill_dir,
        max_prompt_tokens=d.max_prompt_tokens,
        max_new_tokens=d.max_new_tokens,
        batch_size=d.distill_batch_size,
        shard_size=d.distill_shard_size,
        progress=progress,
        on_shard=on_shard,
    )
    return [dict(r) for r in ds]


def global_batch(data: np.ndarray, idx, sharding) -> jax.Array:
    """Rows `idx` of host data as one global array laid out by `sharding`: each process transfers only
    the shards of its own devices (every process computes the same `idx`; one process: a device_put)."""
    rows = data if idx is None else data[idx]
    return jax.make_array_from_callback(rows.shape, sharding, lambda index: rows[index])


def finished_records(tc: TrainConfig) -> list[dict]:
    """The distillation cache as it is on disk (multi-process runs): refused unless it is complete."""
    from m2r2_jax.training.distill import load_distill_cache, read_manifest

    man = read_manifest(tc.data.distill_dir)
    if man is None or not man.get("complete"):
        raise M2R2Error(
            f"the distillation cache {tc.data.distill_dir} is missing or incomplete: build it first with "
            "`python -m train.train --distill-only` in one process"
        )
    return [dict(r) for r in load_distill_cache(tc.data.distill_dir)]


@dataclasses.dataclass
class TrainResult:
    step: int
    m2r2: dict
    history: list  # metrics dicts of the steps run in this call
    draft_ids: np.ndarray


class _StopFlag:
    """SIGTERM -> `set` (the training loop saves and returns) instead of dying mid-step; the previous
    handler comes back after training. Only in the main thread (signals cannot be set elsewhere)."""

    def __init__(self):
        import signal
        import threading

        self.set, self._old = False, None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on)

    def _on(self, signum, frame):
        self.set = True

    def restore(self):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train(
    tc: TrainConfig,
    *,
    model=None,
    records: Sequence[dict] | None = None,
    progress: bool = True,
    stop_at: int | None = None,
) -> TrainResult:
    """Train (or resume) until tc.steps (or `stop_at`, for tests). `model` is a LoadedModel."""
    maybe_initialize_distributed(tc.mesh)
    mesh = make_mesh(tc.mesh)
    if model is None:
        from m2r2_jax.loading.registry import load_model

        model = load_model(tc.model, mesh=mesh)
    cfg, base = model.cfg, model.params
    mc = tc.m2r2.for_base(cfg)
    out = Path(tc.out_dir)
    base_id = C.base_identity(tc.model, cfg, base, getattr(model, "fingerprint", None))
    ckdir = C.ckpt_path(tc.checkpoints)
    latest = C.latest_step(ckdir)  # nothing is created before the inputs are known good
    if latest is not None:  # refuse before any expensive work
        C.check_compatible(C.read_meta(ckdir / str(latest)), base_id, config_to_dict(tc)["m2r2"], str(ckdir))

    if records is None:
        if jax.process_count() > 1:  # one process distils (`--distill-only`), every process then reads it
            records = finished_records(tc)
        else:
            records = distilled_records(tc, model, progress=progress)
    tokens, mask = pack_examples(records, tc.seq_len, loss_on_prompt=tc.data.loss_on_prompt)
    stream = BatchStream(tokens, mask, tc.batch_size, tc.seed)
    draft_ids = rank_draft_vocab(records, cfg.vocab_size, mc.draft_vocab, cfg.eos_token_ids)

    sh = train_shardings(
        mesh, cfg, mc, base, jax.eval_shape(lambda: init_m2r2(cfg, mc, jax.random.key(0))), (tc.batch_size, tc.seq_len)
    )
    m2r2 = jax.jit(lambda k: init_m2r2(cfg, mc, k), out_shardings=sh["m2r2"])(jax.random.key(tc.seed))
    opt, sched = make_optimizer(tc), lr_schedule(tc)
    opt_state, opt_sh = init_opt_state(opt, m2r2, mesh)
    step, pos = 0, 0
    ckpt = C.Checkpointer(ckdir, tc.save_every, tc.keep, tc.async_save)
    if latest is not None:
        abs_of = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)
        extra_abs = {"draft_ids": jax.ShapeDtypeStruct(draft_ids.shape, np.int32)}
        m2r2, opt_state, extra, meta = ckpt.restore(latest, abs_of(m2r2), abs_of(opt_state), extra_abs)
        step, pos = int(meta["step"]), int(meta["data_position"])
        draft_ids = np.asarray(extra["draft_ids"])
    draft_dev = jax.device_put(jnp.asarray(draft_ids), sh["rep"])
    teacher = None
    if tc.data.teacher_cache_dir:
        from m2r2_jax.training.teacher_cache import open_or_build

        teacher = open_or_build(
            tc.data.teacher_cache_dir,
            cfg,
            mc,
            base,
            base_id,
            tokens,
            mask,
            tc.data.teacher_cache_dtype,
            tc.batch_size,
            progress=progress and jax.process_index() == 0,
        )
    step_fn = make_train_step(cfg, mc, opt, sh, opt_sh, cached=teacher is not None)
    base_sh = sh["base"]
    base = jax.tree.map(lambda a, s: a if a.sharding == s else jax.device_put(a, s), base, base_sh)

    def meta_now():
        return {
            "step": step,
            "data_position": pos,
            "seed": tc.seed,
            "config": config_to_dict(tc),
            "base": base_id,
            "draft_vocab_size": int(len(draft_ids)),
            "trainable_params": count_params(m2r2),
            "base_params": count_params(base),
        }

    tracker = Tracker(out, resume_step=step)
    end = min(tc.steps, stop_at) if stop_at is not None else tc.steps
    history = []
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc="train", dynamic_ncols=True)
    # a checkpoint at least every `save_minutes`, and one when the process is told to stop (SIGTERM,
    # as a session or a preemptible VM ends): the step in flight finishes, is saved, and training returns
    stop = _StopFlag()
    last_save, saved_step = time.monotonic(), step
    try:
        while step < end and not stop.set:
            t0 = time.perf_counter()
            idx = stream.indices_at(pos)
            bt, bm = global_batch(tokens, idx, sh["batch"]), global_batch(mask, idx, sh["batch"])
            extra = ()
            if teacher is not None:
                th, tf = teacher.batch(idx)
                extra = (global_batch(th, None, sh["teacher_hid"]), global_batch(tf, None, sh["teacher_final"]))
            m2r2, opt_state, met = step_fn(m2r2, opt_state, base, bt, bm, draft_dev, *extra)
            met = jax.tree.map(np.asarray, met)
            if not (np.isfinite(met["loss"]) and np.isfinite(met["grad_norm"])):
                raise M2R2Error(
                    f"training diverged: non-finite loss or gradient at step {step + 1} (loss "
                    f"{float(met['loss'])}); nothing was saved for it, the last checkpoint is step "
                    f"{ckpt.latest_step()} in {ckpt.dir} (lower lr or clip_norm)"
                )
            dt = time.perf_counter() - t0
            step, pos = step + 1, pos + 1
            met["tokens_per_second"] = float(met["tokens"]) / dt
            met["lr"] = float(sched(step - 1))
            history.append(met)
            if step % tc.log_every == 0 or step == end:
                tracker.log(step, met)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{float(met['loss']):.3f}",
                    agree=f"{float(met['agreement']):.3f}",
                    tok_s=f"{met['tokens_per_second']:.0f}",
                )
            due = tc.save_minutes > 0 and time.monotonic() - last_save >= 60 * tc.save_minutes
            if ckpt.save(
                step, m2r2, opt_state, {"draft_ids": draft_ids}, meta_now(), force=(step == end or due or stop.set)
            ):
                last_save, saved_step = time.monotonic(), step
        if stop.set and saved_step != step:
            # the signal came after this step's save call had decided not to save: save it now
            ckpt.save(step, m2r2, opt_state, {"draft_ids": draft_ids}, meta_now(), force=True)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        ckpt.close()
        tracker.close()
    if jax.process_index() == 0:
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(tc), sort_keys=False))
    return TrainResult(step, m2r2, history, draft_ids)
