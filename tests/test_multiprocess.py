"""Multi-host training for real: 2 processes on localhost (jax.distributed over gloo, 4 forced CPU devices
each) train the same steps as 1 process with 8 devices, with the same losses and params; a checkpoint
written by 2 processes restores in 1, and one written by 1 process restores in 2."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

_WORKER = r"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import numpy as np
import jax
from jax.experimental import multihost_utils
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.sharding import MeshConfig, make_mesh, maybe_initialize_distributed
mesh_cfg = MeshConfig(data=8, fsdp=1, tensor=1, **{dist})
maybe_initialize_distributed(mesh_cfg)
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.loading.registry import LoadedModel, place_params
from m2r2_jax.training.config import DataConfig, TrainConfig
from m2r2_jax.training.trainer import train
from test_multiprocess import RECORDS
cfg, params, _ = load_hf_checkpoint({tiny!r})
mesh = make_mesh(mesh_cfg)
model = LoadedModel(cfg=cfg, params=place_params(cfg, params, mesh), tokenizer=None, source="tiny", kind="hf")
tc = TrainConfig(model="tiny", seq_len=32, batch_size=8, steps={steps}, lr=3e-3, warmup_steps=1, save_every=2,
                 async_save=False, out_dir={out!r}, mesh=mesh_cfg, data=DataConfig(),
                 m2r2=M2R2Config(rate=1, num_fast_layers=2, rank=4, router_dim=8, draft_vocab=64))
r = train(tc, model=model, records=RECORDS, progress=False, stop_at={stop})
if jax.process_index() == 0:
    leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True)).ravel().tolist()
              for x in jax.tree.leaves(r.m2r2)] if jax.process_count() > 1 else \
             [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(r.m2r2)]
    Path({res!r}).write_text(json.dumps({{"step": r.step, "loss": [float(h["loss"]) for h in r.history],
                                         "params": leaves, "processes": jax.process_count(),
                                         "devices": jax.device_count()}}))
elif jax.process_count() > 1:
    for x in jax.tree.leaves(r.m2r2):
        multihost_utils.process_allgather(x, tiled=True)
"""

rs = np.random.RandomState(0)
RECORDS = [
    {"prompt_ids": rs.randint(3, 256, rs.randint(4, 10)).tolist(), "answer_ids": rs.randint(3, 256, 16).tolist()}
    for _ in range(32)
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tiny: Path, out: Path, res: Path, processes: int, steps: int, stop: int) -> None:
    port = _port()
    procs = []
    for pid in range(processes):
        dist = (
            dict(coordinator_address=f"127.0.0.1:{port}", num_processes=processes, process_id=pid)
            if processes > 1
            else {}
        )
        code = _WORKER.format(
            root=str(ROOT),
            tests=str(Path(__file__).parent),
            tiny=str(tiny),
            out=str(out),
            res=str(res),
            steps=steps,
            stop=stop,
            dist=repr(dist),
        )
        n_dev = 8 // processes
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_dev}", JAX_PLATFORMS="cpu")
        procs.append(
            subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    for p in procs:
        out_, err = p.communicate(timeout=900)
        assert p.returncode == 0, err.decode()[-4000:]


@pytest.mark.slow
def test_two_processes_train_like_one_and_checkpoints_cross_over(tiny_llama_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(tiny_llama_dir, one, tmp_path / "r1.json", processes=1, steps=6, stop=4)
    _launch(tiny_llama_dir, two, tmp_path / "r2.json", processes=2, steps=6, stop=4)
    r1, r2 = json.loads((tmp_path / "r1.json").read_text()), json.loads((tmp_path / "r2.json").read_text())
    assert (r1["processes"], r2["processes"], r1["devices"], r2["devices"]) == (1, 2, 8, 8)
    assert r1["step"] == r2["step"] == 4 and len(r1["loss"]) == 4
    np.testing.assert_allclose(r2["loss"], r1["loss"], rtol=1e-5)
    for a, b in zip(r1["params"], r2["params"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    # cross over: the 2-process run's step-4 checkpoint resumes in 1 process, the 1-process one in 2,
    # and both continue to the same step 6
    _launch(tiny_llama_dir, two, tmp_path / "r21.json", processes=1, steps=6, stop=6)
    _launch(tiny_llama_dir, one, tmp_path / "r12.json", processes=2, steps=6, stop=6)
    r21, r12 = json.loads((tmp_path / "r21.json").read_text()), json.loads((tmp_path / "r12.json").read_text())
    assert r21["step"] == r12["step"] == 6 and len(r21["loss"]) == len(r12["loss"]) == 2
    np.testing.assert_allclose(r21["loss"], r12["loss"], rtol=1e-5)
    for a, b in zip(r21["params"], r12["params"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
