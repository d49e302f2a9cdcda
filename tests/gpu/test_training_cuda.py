"""A tiny DPO run on the device (full fine-tuning and LoRA) follows the CPU's trajectory in fp32.

The same config trains twice: here on the device through ``Trainer`` (its accelerator on CUDA), and in
a subprocess that sees no GPU (``CUDA_VISIBLE_DEVICES=""``, so on the CPU). Losses, gradient norms and
the final weights agree to 1e-4 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from engine.conftest import arithmetic_rows, metric_rows, write_jsonl

pytestmark = pytest.mark.gpu

STEPS = 3
RUNS = {
    "full": {"max_grad_norm": 10.0},
    "lora": {"lora": {"enabled": True, "r": 4, "alpha": 8}, "save_merged": True, "max_grad_norm": 10.0},
}
CPU_WORKER = (
    "import json, sys\n"
    "from preftune.trainer import train\n"
    "for cfg in json.load(open(sys.argv[1])):\n"
    "    train(cfg)\n"
)


def _config(root, tiny_model_dir, files, where: str, run: str) -> dict:
    return {
        "model": str(tiny_model_dir),
        "data": {"train": files[0], "eval": files[1]},
        "method": "dpo",
        "batch_size": 4,
        "max_steps": STEPS,
        "logging_steps": 1,
        "learning_rate": 1e-2,
        "lr_scheduler": "constant",
        "precision": "fp32",
        "output_dir": str(root / f"{where}-{run}"),
        "cache_dir": str(root / f"cache-{where}"),  # references scored on each side's own device
        "progress": False,
        "report_to": [],
        **RUNS[run],
    }


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted((run_dir / "final").glob("*.safetensors")):
        state.update(load_file(f))
    return state


@pytest.fixture(scope="module", params=list(RUNS))
def trajectories(request, tiny_model_dir, tmp_path_factory, device):
    """(CPU run directory, device run directory) of one run of RUNS."""
    from preftune import runlock
    from preftune.config import load_config
    from preftune.trainer import Trainer

    run = request.param
    root = tmp_path_factory.mktemp(f"device-training-{run}")
    files = (
        write_jsonl(root / "train.jsonl", arithmetic_rows(12)),
        write_jsonl(root / "eval.jsonl", arithmetic_rows(4, 1)),
    )
    spec = root / "cpu.json"
    spec.write_text(json.dumps([_config(root, tiny_model_dir, files, "cpu", run)]))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    cpu = subprocess.run(
        [sys.executable, "-c", CPU_WORKER, str(spec)], env=env, capture_output=True, text=True, timeout=300
    )
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    cfg = load_config(_config(root, tiny_model_dir, files, "device", run))
    trainer = Trainer(cfg)
    try:
        assert trainer.run.accelerator.device.type == device.type
        assert next(trainer.run.model.parameters()).device.type == device.type
        trainer.fit()
    finally:
        runlock.release(cfg.output_dir)
    return root / f"cpu-{run}", root / f"device-{run}"


def test_device_trajectory_equals_the_cpu_one(trajectories):
    cpu_dir, dev_dir = trajectories
    cpu, dev = metric_rows(cpu_dir, "loss"), metric_rows(dev_dir, "loss")
    assert [r["step"] for r in dev] == [r["step"] for r in cpu] == list(range(1, STEPS + 1))
    assert abs(cpu[-1]["loss"] - cpu[0]["loss"]) > 1e-3  # the trajectory moves
    for c, d in zip(cpu, dev):
        assert d["loss"] == pytest.approx(c["loss"], rel=1e-4), (c["step"], c["loss"], d["loss"])
        assert d["grad_norm"] == pytest.approx(c["grad_norm"], rel=1e-4), (c["step"], c, d)
    want, got = _final_weights(cpu_dir), _final_weights(dev_dir)
    assert want.keys() == got.keys() and want
    for k, w in want.items():
        diff = float((got[k].double() - w.double()).norm())
        assert diff <= 1e-4 * float(w.double().norm()) + 1e-12, (k, diff)
